"""Cold query cost: wall time of a whole `matsearch search` process, and a query image's decode.

    python -m benchmarks.query_cold [--index DIR --query FILE] [--runs 7] [--photos FILE...] [--json OUT]
    python -m benchmarks.query_cold --compare /tmp/old-tree      # and an older tree's search, in the same loop

1. Cold search: `python -m app.cli search QUERY --index DIR` in a fresh process, --runs times (median, min, max wall
   seconds and the process's user+sys CPU seconds), interleaved with as many `python -c "import torch"` processes:
   the floor no query can go under, measured under the same load (with --compare, also another source tree's search,
   e.g. the commit before a change). The 1-minute load average is recorded before every
   run: on a shared machine, wall time follows the load. Without --index, a 50-item index of fashion-mnist:test
   (else of generated PNGs) is built in a temporary folder with the shipped model, and one of its images is the query.
2. Decode: for each photo, the decode of the file's bytes at the model's input size (vision_model.images.decode_image
   with target_size, as an upload in the UI and a query are decoded: JPEG draft mode) and the preprocessing to
   model input, median of --repeat runs, wall and this thread's CPU ms, for the shipped model (28 px) and the
   paper's 224 px configs. Default photos: a 1920x1200 and a 3840x2400 baseline JPEG and a 51 KB PNG from the
   Debian wallpaper and clip-art packages, where installed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = ("/usr/share/backgrounds/mate/nature/Blinds.jpg",  # 1920x1200 baseline JPEG, 1.1 MB
                  "/usr/share/backgrounds/the-mouse.jpg",  # 3840x2400 baseline JPEG, 1.3 MB
                  "/usr/share/openclipart/png/signs_and_symbols/flags/miscellany/unicef.png")  # 1134x794, 51 KB
DECODE_CONFIGS = ("matmamba_vision_fmnist", "matmamba_vision_35m")


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def _timed_process(argv: list[str], cwd: Path = ROOT) -> tuple[float, float]:
    """(wall s, user+sys CPU s) of one child process, which must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {out.stderr.strip().splitlines()[-1:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "runs": [round(v, 3) for v in values]}


def cold_search(index_dir: Path, query: Path, runs: int, checkout: Path = ROOT, compare: Path | None = None) -> dict:
    """Per run, in turn: this tree's search, `import torch` alone and, with `compare`, that tree's search: all three
    under the same load."""
    search = [sys.executable, "-m", "app.cli", "search", str(query), "--index", str(index_dir), "--k", "5"]
    commands = {"search": (search, checkout), "import_torch": ([sys.executable, "-c", "import torch"], checkout)}
    if compare is not None:
        commands["compare_search"] = (search, compare)
    for argv, cwd in commands.values():
        _timed_process(argv, cwd)  # the page cache holds the libraries and the index afterwards: every run alike
    rows = {name: [] for name in commands}
    loads = []
    for _ in range(runs):
        loads.append(load_average())
        for name, (argv, cwd) in commands.items():
            rows[name].append(_timed_process(argv, cwd))
    out = {"command": " ".join(["python", "-m", "app.cli", "search", query.name, "--index", "DIR", "--k", "5"]),
           "load_average_1min": _summary(loads)}
    if compare is not None:
        out["compare_checkout"] = str(compare)
    for name, samples in rows.items():
        out[name] = {"wall_s": _summary([w for w, _ in samples]), "cpu_s": _summary([c for _, c in samples])}
    out["search_minus_import_torch_wall_s"] = round(out["search"]["wall_s"]["median"]
                                                    - out["import_torch"]["wall_s"]["median"], 3)
    return out


def _median_ms(fn, repeat: int) -> tuple[float, float, object]:
    wall, cpu, result = [], [], None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.thread_time()
        result = fn()
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.thread_time() - start_cpu) * 1e3)
    return statistics.median(wall), statistics.median(cpu), result


def decode_times(photos: list[Path], repeat: int) -> list[dict]:
    import torch
    from PIL import Image

    from vision_model.config import get_config
    from vision_model.images import decode_image
    from vision_model.preprocess import decode_size, to_model_input

    torch.set_num_threads(1)  # a query's work on one thread: its CPU time is the whole of it
    rows = []
    for path in photos:
        data = path.read_bytes()
        with Image.open(path) as img:
            stored, fmt, progressive = img.size, img.format, bool(img.info.get("progressive"))
        for name in DECODE_CONFIGS:
            config = get_config(name)
            target = decode_size(config)
            decode_ms, decode_cpu, img = _median_ms(lambda: decode_image(data, target_size=target), repeat)
            prep_ms, prep_cpu, _ = _median_ms(lambda: to_model_input(config, img), repeat)
            rows.append({"file": path.name, "format": fmt, "progressive": progressive, "bytes": len(data),
                         "stored_size": list(stored), "model": name, "target_size": target,
                         "decoded_size": list(img.size), "load_average_1min": load_average(),
                         "decode_ms": round(decode_ms, 2), "decode_cpu_ms": round(decode_cpu, 2),
                         "preprocess_ms": round(prep_ms, 2), "preprocess_cpu_ms": round(prep_cpu, 2),
                         "total_ms": round(decode_ms + prep_ms, 2), "total_cpu_ms": round(decode_cpu + prep_cpu, 2)})
    return rows


def _small_index(workdir: Path) -> tuple[Path, Path]:
    """A 50-item index with the shipped model and a query image from its collection."""
    from PIL import Image

    from index import build_index

    images = workdir / "images"
    images.mkdir()
    try:
        from vision_model.datasets import load_fashion_mnist
        pixels, _ = load_fashion_mnist("test")
        arrays = [pixels[i].numpy()[0] for i in range(50)]
    except Exception:  # Fashion-MNIST not installed: generated grey images stand in
        import numpy as np
        rng = np.random.default_rng(0)
        arrays = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(50)]
    for i, arr in enumerate(arrays):
        Image.fromarray(arr).save(images / f"{i:03d}.png")
    build_index(str(images), workdir / "index", progress=False, workers=0, device="cpu")
    return workdir / "index", images / "003.png"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, help="index folder (default: a 50-item index built here)")
    parser.add_argument("--query", type=Path, help="query image (with --index)")
    parser.add_argument("--runs", type=int, default=7, help="cold search processes (default 7)")
    parser.add_argument("--photos", type=Path, nargs="*", help="files for the decode timings (default: "
                                                               "Debian wallpapers and clip art, where installed)")
    parser.add_argument("--repeat", type=int, default=15, help="decodes per photo and model (default 15)")
    parser.add_argument("--checkout", type=Path, default=ROOT,
                        help="source tree whose `python -m app.cli search` runs (e.g. an older commit, to compare)")
    parser.add_argument("--compare", type=Path, help="another source tree (e.g. the commit before a change) whose "
                                                      "search runs in the same loop, under the same load")
    parser.add_argument("--machine", default="", help="words naming the machine, stored in the results")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if (args.index is None) != (args.query is None):
        parser.error("--index and --query go together")

    result = {"machine": args.machine or f"{platform.machine()}, {os.cpu_count()} cores", "python": sys.version.split()[0],
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    workdir = None
    try:
        if args.index is None:
            workdir = Path(tempfile.mkdtemp(prefix="query-cold-"))
            args.index, args.query = _small_index(workdir)
            result["index"] = "50 Fashion-MNIST test images (PNG), shipped model, Flat"
        else:
            result["index"] = str(args.index)
        result["checkout"] = str(args.checkout)
        result["cold_search"] = cold_search(args.index, args.query, args.runs, args.checkout.resolve(),
                                            args.compare.resolve() if args.compare else None)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    photos = [Path(p) for p in (args.photos if args.photos is not None else DEFAULT_PHOTOS) if Path(p).is_file()]
    result["decode"] = decode_times(photos, args.repeat)

    cs = result["cold_search"]
    print(f"cold `matsearch search` ({args.runs} runs, load average {cs['load_average_1min']['median']}): "
          f"median {cs['search']['wall_s']['median']:.2f} s wall (min {cs['search']['wall_s']['min']:.2f}), "
          f"{cs['search']['cpu_s']['median']:.2f} s CPU; `import torch` alone: median "
          f"{cs['import_torch']['wall_s']['median']:.2f} s wall, {cs['import_torch']['cpu_s']['median']:.2f} s CPU")
    if "compare_search" in cs:
        print(f"{args.compare}'s search, same runs: median {cs['compare_search']['wall_s']['median']:.2f} s wall, "
              f"{cs['compare_search']['cpu_s']['median']:.2f} s CPU")
    print(f"{'file':<16} {'KB':>6} {'stored':>10} {'model':<24} {'decoded':>9} {'decode ms':>9} {'cpu':>6} "
          f"{'prep ms':>7} {'total ms':>8} {'total cpu':>9}")
    for r in result["decode"]:
        print(f"{r['file'][:16]:<16} {r['bytes'] / 1024:6.0f} {'x'.join(map(str, r['stored_size'])):>10} "
              f"{r['model']:<24} {'x'.join(map(str, r['decoded_size'])):>9} {r['decode_ms']:9.1f} "
              f"{r['decode_cpu_ms']:6.1f} {r['preprocess_ms']:7.1f} {r['total_ms']:8.1f} {r['total_cpu_ms']:9.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
