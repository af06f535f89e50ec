"""Query-path decode time: file -> model input, at full size and decoded for the model's input size.

    python -m benchmarks.decode_speed FILE... [--repeat 7] [--json OUT]

For each file and model input size (28: the shipped Fashion-MNIST model; 224: the paper's ImageNet configs), the
median over --repeat runs (wall and this thread's CPU time) of decode_image (read + decode + EXIF + flatten) and
of to_model_input, with target_size=None (every pixel decoded) and target_size=img_size (JPEG draft / integer
reduction), as a query and an index build decode.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from PIL import Image

from vision_model.config import get_config
from vision_model.images import decode_image
from vision_model.preprocess import to_model_input

CONFIGS = ("matmamba_vision_fmnist", "matmamba_vision_35m")


def _median_ms(fn, repeat: int) -> tuple[float, float, object]:
    """(median wall ms, median CPU ms of this thread, fn's result): on a shared machine the CPU time is the
    figure that does not count other processes' turns."""
    wall, cpu, out = [], [], None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.thread_time()
        out = fn()
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.thread_time() - start_cpu) * 1e3)
    return statistics.median(wall), statistics.median(cpu), out


def measure(path: Path, repeat: int) -> list[dict]:
    with Image.open(path) as img:
        progressive = bool(img.info.get("progressive"))
    rows = []
    for name in CONFIGS:
        config = get_config(name)
        for target in (None, config.img_size):
            decode_ms, decode_cpu, img = _median_ms(lambda: decode_image(path, target_size=target), repeat)
            prep_ms, prep_cpu, _ = _median_ms(lambda: to_model_input(config, img), repeat)
            rows.append({"file": path.name, "bytes": path.stat().st_size, "progressive": progressive,
                         "model_input": config.img_size, "target_size": target, "decoded_size": list(img.size),
                         "decode_ms": round(decode_ms, 2), "preprocess_ms": round(prep_ms, 2),
                         "total_ms": round(decode_ms + prep_ms, 2), "decode_cpu_ms": round(decode_cpu, 2),
                         "preprocess_cpu_ms": round(prep_cpu, 2), "total_cpu_ms": round(decode_cpu + prep_cpu, 2)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # one query's work on one thread: its CPU time is then the whole of it
    rows = [row for path in args.files for row in measure(path, args.repeat)]
    print(f"{'file':<30} {'KB':>6} {'input':>5} {'target':>6} {'decoded':>11} {'total wall ms':>13} "
          f"{'decode cpu ms':>13} {'prep cpu ms':>11} {'total cpu ms':>12}")
    for r in rows:
        decoded = "x".join(map(str, r["decoded_size"]))
        name = r["file"][:28] + (" p" if r["progressive"] else "")
        print(f"{name:<30} {r['bytes'] / 1024:6.0f} {r['model_input']:>5} {str(r['target_size']):>6} "
              f"{decoded:>11} {r['total_ms']:13.1f} {r['decode_cpu_ms']:13.1f} {r['preprocess_cpu_ms']:11.1f} "
              f"{r['total_cpu_ms']:12.1f}")
    print("(p: progressive JPEG; cpu: this thread's CPU time, which other processes' load does not inflate)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
