"""GPU run of `matsearch index build --engine ray` against the local engine, on the same folder of photo JPEGs.

    python3 -m benchmarks.gpu.ray_index --images 20000 --out $OUT            # 1 GPU: ray, local, ray 2x0.5 GPU
    python3 -m benchmarks.gpu.ray_index --images 50000 --gpus 1,2,4 --out $OUT   # a multi-GPU host (issue 26)

Makes N photo-sized JPEGs (smooth random colour fields with edges and noise, 640x480, made in parallel), saves a
random-weight model of the 35M config (matmamba_vision_35m, 224 px), then builds the index of the folder with the
local engine and with the Ray engine for each GPU count (one actor per GPU) and with two actors sharing one GPU
(num_gpus=0.5 each: the multi-actor code path on a single GPU). Prints images/s, the GPU utilisation sampled with
nvidia-smi while each build runs, and whether each index equals the local engine's (same metadata, vectors within
--atol); writes ray_index.json under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def _make_photos(args: tuple[str, int, int]) -> None:
    from PIL import Image, ImageFilter

    folder, start, stop = args
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)  # a coarse colour layout, blown up smoothly
        img = Image.fromarray(small).resize((640, 480), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, (480, 640, 3))  # sensor-like noise
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8)).filter(ImageFilter.EDGE_ENHANCE)
        sub = Path(folder) / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        img.save(sub / f"photo{i:07d}.jpg", quality=85)


def make_photos(folder: Path, n: int) -> float:
    started = time.perf_counter()
    existing = sum(1 for _ in folder.rglob("*.jpg")) if folder.is_dir() else 0
    if existing != n:
        shutil.rmtree(folder, ignore_errors=True)
        step = 500
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_make_photos, [(str(folder), s, min(s + step, n)) for s in range(0, n, step)]))
    return time.perf_counter() - started


class GpuSampler:
    """nvidia-smi utilisation and memory of every GPU, sampled twice a second while a build runs."""

    def __init__(self):
        self.samples: list[list[tuple[float, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
                self.samples.append([tuple(float(v) for v in line.split(",")) for line in out.stdout.splitlines()])
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        util = np.array([[u for u, _ in s] for s in self.samples if s])
        mem = np.array([[m for _, m in s] for s in self.samples if s])
        return {"gpu_util_mean": [round(v, 1) for v in util.mean(0)], "gpu_util_max": util.max(0).tolist(),
                "gpu_mem_mb_max": mem.max(0).tolist(), "samples": len(util)}


def run_build(label: str, folder: Path, out: Path, model_dir: Path, args, **engine) -> dict:
    from index import build_index

    shutil.rmtree(out, ignore_errors=True)
    with GpuSampler() as gpu:
        started = time.perf_counter()
        result = build_index(str(folder), out, model_dir=model_dir, device=args.device, batch_size=args.batch_size,
                             workers=args.workers, shard_size=args.shard_size, progress=False, **engine)
        seconds = time.perf_counter() - started
    build = result.manifest["build"]
    row = {"run": label, "images": result.manifest["count"], "seconds": round(seconds, 2),
           "images_per_second": round(result.manifest["count"] / seconds, 1),
           "encode_images_per_second": build["images_per_second"], "stage_seconds": build.get("stage_seconds"),
           **gpu.summary(), **engine}
    print(json.dumps(row), flush=True)
    return row


def same_index(a: Path, b: Path, atol: float) -> dict:
    import sqlite3

    from index.store import resolve_version_dir

    va, vb = resolve_version_dir(a), resolve_version_dir(b)
    ea, eb = np.load(va / "embeddings.npy", mmap_mode="r"), np.load(vb / "embeddings.npy", mmap_mode="r")
    rows = []
    for v in (va, vb):
        db = sqlite3.connect(v / "metadata.sqlite")
        rows.append(db.execute("SELECT key, sha256, width, height FROM items ORDER BY id").fetchall())
        db.close()
    diff = float(np.abs(np.asarray(ea) - np.asarray(eb)).max()) if ea.shape == eb.shape else float("inf")
    return {"metadata_equal": rows[0] == rows[1], "max_abs_diff": diff, "equal": rows[0] == rows[1] and diff <= atol}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--gpus", default="1", help="GPU counts for the Ray engine, e.g. 1,2,4 (default 1)")
    p.add_argument("--shared", action=argparse.BooleanOptionalAction, default=True,
                   help="also run two actors sharing one GPU (num_gpus=0.5 each)")
    p.add_argument("--model", default="matmamba_vision_35m")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="decode CPUs")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu runs CPU actors (a smoke test)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest vector difference counted as equal")
    p.add_argument("--work", default="/tmp/ray_index")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch

    import vision_model

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "photos"
    made = make_photos(folder, args.images)
    print(f"{args.images} photos in {made:.1f} s", flush=True)
    torch.manual_seed(0)
    model_dir = vision_model.save_pretrained(vision_model.create_model(args.model), work / "model")
    on_gpu = args.device.startswith("cuda")
    gpus_available = torch.cuda.device_count() if on_gpu else 1

    # the Ray engine decodes on CPU tasks, so the local engine it is compared with decodes on the CPU too (nvJPEG's
    # pixels differ from Pillow's by a few grey levels: not the same vectors); the GPU-decoding local build is the
    # throughput it has to catch up with
    rows = [run_build("local", folder, work / "idx-local", model_dir, args, decode="cpu")]
    if args.device == "cuda":
        rows.append(run_build("local, nvJPEG decode", folder, work / "idx-local-gpu", model_dir, args, decode="gpu"))
    for g in (int(v) for v in args.gpus.split(",")):
        if g > gpus_available:
            rows.append({"run": f"ray {g} GPU", "skipped": f"only {gpus_available} GPUs here"})
            continue
        row = run_build(f"ray {g} GPU", folder, work / f"idx-ray{g}", model_dir, args, engine="ray", ray_actors=g,
                        ray_gpus_per_actor=1.0 if on_gpu else 0.0)
        row.update(same_index(work / "idx-local", work / f"idx-ray{g}", args.atol))
        rows.append(row)
    if args.shared:
        row = run_build("ray 2 actors on 1 GPU", folder, work / "idx-ray-shared", model_dir, args, engine="ray",
                        ray_actors=2, ray_gpus_per_actor=0.5 if on_gpu else 0.0)
        row.update(same_index(work / "idx-local", work / "idx-ray-shared", args.atol))
        rows.append(row)
    one = next((r for r in rows if r["run"] == "ray 1 GPU" and "images_per_second" in r), None)
    for r in rows:
        if one and r["run"].startswith("ray ") and "GPU" in r["run"] and "images_per_second" in r \
                and "actors" not in r["run"]:
            g = int(r["run"].split()[1])
            r["scaling_efficiency"] = round(r["images_per_second"] / (g * one["images_per_second"]), 3)

    import ray

    result = {"images": args.images, "model": args.model, "img_size": 224, "batch_size": args.batch_size,
              "workers": args.workers, "cpus": os.cpu_count(), "gpus": gpus_available,
              "gpu_name": torch.cuda.get_device_name(0) if on_gpu else None, "ray": ray.__version__,
              "torch": torch.__version__, "rows": rows}
    (out / "ray_index.json").write_text(json.dumps(result, indent=2))
    print(f"\n{'run':<24} {'img/s':>8} {'GPU util %':>12} {'equal':>6} {'max diff':>9}")
    for r in rows:
        if "images_per_second" not in r:
            print(f"{r['run']:<24} {r.get('skipped', '')}")
            continue
        util = ",".join(f"{u:.0f}" for u in r.get("gpu_util_mean", []))
        print(f"{r['run']:<24} {r['images_per_second']:8.1f} {util:>12} {str(r.get('equal', '-')):>6} "
              f"{r.get('max_abs_diff', 0):9.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
