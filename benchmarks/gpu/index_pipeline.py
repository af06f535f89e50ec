"""GPU run (not part of CI): index-build throughput against encoder-only throughput, in one go.

    pip install .data/wheels/faiss_cpu-*.whl      # the GPU machine has no faiss
    MATSEARCH_FASHION_MNIST=.data/fmnist python3 -m benchmarks.gpu.index_pipeline --out $OUT

1. Photos: --photos (20,000) JPEGs of 640x480 to 4000x3000, made on this machine in parallel: --unique (3,000)
   procedural scenes with grain, the rest byte copies of them with distinct trailing bytes (ignored by decoders,
   so every file has its own sha256; decoding costs what the original costs).
2. The 35M config (random weights) at 224 px, bf16: encoder-only img/s on pre-decoded pixels, then `index build`
   of all the photos, with its stage breakdown (benchmarks/index_build.py).
3. The shipped Fashion-MNIST model on fashion-mnist:train (60,000 28x28 arrays), the same two measurements.
4. bf16 against fp32 (the build encodes in bf16 on CUDA): on fashion-mnist:test, the cosine of each bf16 vector
   with its fp32 vector and recall@10 of bf16 neighbours against fp32 neighbours.
A table is printed last; results.json under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch


def copies(folder: Path, unique: int, total: int) -> None:
    """photo-NNNNNN.jpg for unique..total-1: the bytes of photo (i % unique) plus 8 trailing bytes of i."""
    from concurrent.futures import ThreadPoolExecutor

    def copy(i: int) -> None:
        path = folder / f"photo-{i:06d}.jpg"
        if not path.exists():
            data = (folder / f"photo-{i % unique:06d}.jpg").read_bytes()
            path.write_bytes(data + i.to_bytes(8, "little"))

    with ThreadPoolExecutor(16) as pool:  # file I/O: threads suffice
        list(pool.map(copy, range(unique, total)))


def bf16_check(n: int = 10_000, device: str = "cuda") -> dict:
    import numpy as np

    import vision_model
    from index.sources import open_source
    from index.pipeline import embed_batch
    from vision_model.preprocess import to_model_input

    model = vision_model.load_model(device=device).eval()
    src = open_source("fashion-mnist:test", n)
    pixels = torch.from_numpy(np.stack([item.array for item in src.items])).to(device)
    bf16 = torch.cat([embed_batch(model, pixels[i:i + 1024]) for i in range(0, len(pixels), 1024)])
    with torch.inference_mode():
        fp32 = torch.cat([torch.nn.functional.normalize(model.embed(to_model_input(model.config, pixels[i:i + 1024]),
                                                                    level=1).float(), dim=-1)
                          for i in range(0, len(pixels), 1024)])
        cos = (bf16 * fp32).sum(-1)
        top_b = (bf16 @ bf16.T).topk(11, dim=1).indices[:, 1:]
        top_f = (fp32 @ fp32.T).topk(11, dim=1).indices[:, 1:]
        hits = (top_b[:, :, None] == top_f[:, None, :]).any(-1).float().mean().item()
    return {"items": len(pixels), "cosine_min": round(cos.min().item(), 5), "cosine_mean": round(cos.mean().item(), 6),
            "recall_at_10_vs_fp32": round(hits, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--photos", type=int, default=20_000)
    parser.add_argument("--unique", type=int, default=3_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/index-pipeline"), help="photos and indexes")
    parser.add_argument("--encoder-seconds", type=float, default=8.0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["photos", "fmnist", "bf16"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from benchmarks import index_build
    from benchmarks.photos import make_photos

    results = {"device": torch.cuda.get_device_name(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__}
    photos = args.work / "photos"
    if "photos" not in args.skip:
        start = time.perf_counter()
        make_photos(photos, min(args.unique, args.photos), use_wallpapers=False)
        copies(photos, min(args.unique, args.photos), args.photos)
        results["photo_seconds"] = round(time.perf_counter() - start, 1)
        print(f"{args.photos} photos in {results['photo_seconds']} s", flush=True)
        parser_b = argparse.ArgumentParser()
        index_build.add_arguments(parser_b)
        bench = parser_b.parse_args(["--source", str(photos), "--model", "matmamba_vision_35m", "--device", "cuda",
                                     "--batch-size", "256", "--encoder-seconds", str(args.encoder_seconds),
                                     "--out", str(args.out / "photos_35m.json")])
        index_build.run(bench)
        results["photos_35m"] = json.loads((args.out / "photos_35m.json").read_text())
        shutil.rmtree(photos, ignore_errors=True)
    if "fmnist" not in args.skip:
        parser_b = argparse.ArgumentParser()
        index_build.add_arguments(parser_b)
        bench = parser_b.parse_args(["--source", "fashion-mnist:train", "--device", "cuda", "--batch-size", "1024",
                                     "--encoder-seconds", str(args.encoder_seconds),
                                     "--out", str(args.out / "fmnist_shipped.json")])
        index_build.run(bench)
        results["fmnist_shipped"] = json.loads((args.out / "fmnist_shipped.json").read_text())
    if "bf16" not in args.skip:
        results["bf16_vs_fp32"] = bf16_check()
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{results['device']}, {results['cores']} cores")
    print(f"{'run':<16} {'items':>7} {'encoder img/s':>14} {'build img/s':>12} {'ratio':>6}  stage seconds")
    for name in ("photos_35m", "fmnist_shipped"):
        r = results.get(name)
        if r:
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["build"]["stage_seconds"].items())
            print(f"{name:<16} {r['items']:>7} {r['encoder_only']['images_per_second']:>14.0f} "
                  f"{r['build']['images_per_second']:>12.0f} {r['build_vs_encoder']:>6.0%}  {stages}")
    if "bf16_vs_fp32" in results:
        print(f"bf16 vs fp32: {results['bf16_vs_fp32']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
