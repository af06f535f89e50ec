"""Query-path decode time: file -> model input, at full size and decoded for the model's input size.

    python -m benchmarks.decode_speed FILE... [--repeat 7] [--json OUT]

For each file and model input size (28: the shipped Fashion-MNIST model; 224: the paper's ImageNet configs), the
median over --repeat runs of decode_image (read + decode + EXIF + flatten) and of to_model_input, with
target_size=None (every pixel decoded) and target_size=img_size (JPEG draft / integer reduction), as a query and
an index build decode.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from vision_model.config import get_config
from vision_model.images import decode_image
from vision_model.preprocess import to_model_input

CONFIGS = ("matmamba_vision_fmnist", "matmamba_vision_35m")


def _median_ms(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def measure(path: Path, repeat: int) -> list[dict]:
    rows = []
    for name in CONFIGS:
        config = get_config(name)
        for target in (None, config.img_size):
            decode_ms, img = _median_ms(lambda: decode_image(path, target_size=target), repeat)
            prep_ms, _ = _median_ms(lambda: to_model_input(config, img), repeat)
            rows.append({"file": path.name, "bytes": path.stat().st_size, "model_input": config.img_size,
                         "target_size": target, "decoded_size": list(img.size), "decode_ms": round(decode_ms, 2),
                         "preprocess_ms": round(prep_ms, 2), "total_ms": round(decode_ms + prep_ms, 2)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = [row for path in args.files for row in measure(path, args.repeat)]
    print(f"{'file':<34} {'KB':>6} {'input':>5} {'target':>6} {'decoded':>11} {'decode ms':>9} {'prep ms':>8} "
          f"{'total ms':>8}")
    for r in rows:
        decoded = "x".join(map(str, r["decoded_size"]))
        print(f"{r['file'][:34]:<34} {r['bytes'] / 1024:6.0f} {r['model_input']:>5} {str(r['target_size']):>6} "
              f"{decoded:>11} {r['decode_ms']:9.1f} {r['preprocess_ms']:8.1f} {r['total_ms']:8.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
