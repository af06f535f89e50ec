"""`matsearch bench index`: index-build throughput against encoder-only throughput, in the same run, per stage.

    matsearch bench index --photos 200 --min-mp 5 --device cpu              # 200 photo JPEGs of 5 MP or more
    matsearch bench index --source fashion-mnist:train --device cpu         # small images: encoder-bound
    matsearch bench index --photos 20000 --model matmamba_vision_35m --device cuda --batch-size 256
    matsearch bench index --source DIR --model path/to/model                # any folder of images

Encoder-only: the same model, batch size, dtype and embedding call as the build (pipeline.embed_batch), on
uint8 model pixels decoded beforehand and already on the device: the most a build could reach. Full build:
`index build` of the whole source into a fresh folder, timed end to end; its manifest's per-stage seconds
(read, decode, preprocess: summed over worker processes; wait: the encoder waiting for them; encode: device time;
write; assemble) show where the rest went. --model takes a model folder or a config name (random weights).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PHOTO_DIR = Path(".data/bench-photos")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--source", help="SOURCE to index: a folder of images, imagefolder:DIR or fashion-mnist:SPLIT")
    what.add_argument("--photos", type=int, default=200, help="make this many photo-sized JPEGs and index them "
                                                              "(default 200; kept in --photo-dir for the next run)")
    parser.add_argument("--min-mp", type=float, default=0.0, help="with --photos: only sizes of at least this many "
                                                                  "megapixels (default: 640x480 to 4000x3000)")
    parser.add_argument("--photo-dir", type=Path, help=f"where --photos go (default {DEFAULT_PHOTO_DIR}/N-MINMP)")
    parser.add_argument("--model", help="model folder or config name, e.g. matmamba_vision_35m (random weights); "
                                        "default: the shipped model")
    parser.add_argument("--img-size", type=int, help="with a config name: its input size (default: the config's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, help="decoding processes (default: the build's default)")
    parser.add_argument("--decode", choices=("auto", "cpu", "gpu"), default="auto",
                        help="where the build decodes JPEGs (index build --decode; default auto)")
    parser.add_argument("--limit", type=int, help="only the first N items of --source")
    parser.add_argument("--encoder-seconds", type=float, default=10.0, help="how long to time encoder-only")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--keep-index", type=Path, help="build the index here and keep it (default: a temp folder)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def model_folder(spec: str | None, img_size: int | None, scratch: Path) -> Path | None:
    """A model folder for --model: the folder itself, or a new random-weight model of the named config."""
    if spec is None or Path(spec).is_dir():
        return Path(spec) if spec else None
    import torch

    from vision_model import MatMambaVision, get_config, save_pretrained

    overrides = {"img_size": img_size} if img_size else {}
    torch.manual_seed(0)
    model = MatMambaVision(get_config(spec, **overrides))
    return save_pretrained(model, scratch / f"{spec}-random", dtype=None)


def encoder_only(model, device, pixels, batch_size: int, views: str, seconds: float) -> dict:
    """img/s of pipeline.embed_batch on pre-decoded uint8 pixels already on the device, full batches."""
    import torch

    from index.pipeline import embed_batch

    reps = -(-batch_size // len(pixels))
    batch = pixels.repeat(reps, 1, 1, 1)[:batch_size].to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):  # warm-up: autotuning, caches
        embed_batch(model, batch, views)
    sync()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        embed_batch(model, batch, views)
        calls += 1
        if device.type == "cuda" and calls % 8 == 0:
            sync()
    sync()
    elapsed = time.perf_counter() - start
    return {"images_per_second": round(calls * batch_size / elapsed, 1), "batches": calls, "seconds": round(elapsed, 3)}


def predecode(items, config, count: int):
    """uint8 model pixels of the first `count` good items, decoded as the build decodes them."""
    import torch

    from index.pipeline import prepare_item

    pixels = []
    for item in items:
        p = prepare_item(item, config)
        if p.pixels is not None:
            pixels.append(p.pixels)
        if len(pixels) == count:
            break
    if not pixels:
        raise ValueError("no decodable image in the source")
    return torch.stack(pixels)


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(args: argparse.Namespace) -> int:
    import torch

    import vision_model
    from index.build import build_index, resolve_device
    from index.pipeline import autocast_dtype, default_workers
    from index.sources import open_source

    from .photos import make_photos

    device = resolve_device(args.device)
    scratch = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        if args.source:
            source, made = args.source, None
        else:
            folder = args.photo_dir or DEFAULT_PHOTO_DIR / f"{args.photos}-{args.min_mp:g}mp"
            start = time.perf_counter()
            paths = make_photos(folder, args.photos, min_pixels=int(args.min_mp * 1e6))
            made = {"count": len(paths), "seconds": round(time.perf_counter() - start, 1),
                    "megapixels_mean": round(sum(_pixels(p) for p in paths[:200]) / min(200, len(paths)) / 1e6, 2),
                    "megabytes_mean": round(sum(p.stat().st_size for p in paths) / len(paths) / 1e6, 2)}
            print(f"photos: {folder} ({made})", flush=True)
            source = str(folder)
        model_dir = model_folder(args.model, args.img_size, scratch)
        model = vision_model.load_model(model_dir, device=device).eval()
        cfg = model.config
        src = open_source(source, args.limit)

        workers = default_workers(device) if args.workers is None else args.workers
        if device.type == "cpu" and workers:  # the threads the build's encoder gets beside its workers (build.py)
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - workers))
        decoded = predecode(src.items, cfg, min(args.batch_size, len(src)))
        encoder = encoder_only(model, device, decoded, args.batch_size, "1", args.encoder_seconds)
        print(f"encoder-only: {encoder['images_per_second']} img/s", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

        out_dir = args.keep_index or scratch / "index"
        if args.keep_index:
            shutil.rmtree(out_dir, ignore_errors=True)
        cpu0, start = cpu_seconds(), time.perf_counter()
        result = build_index(source, out_dir, model_dir=model_dir, batch_size=args.batch_size, device=str(device),
                             workers=workers, limit=args.limit, progress=sys.stderr.isatty(), decode=args.decode)
        wall = time.perf_counter() - start
        cpu = cpu_seconds() - cpu0
        build = result.manifest["build"]
        n = build["items_seen"]
        report = {
            "machine": _machine(device), "cores": len(os.sched_getaffinity(0)), "load_average": os.getloadavg(),
            "source": source, "photos": made, "items": n, "model": cfg.name, "img_size": cfg.img_size,
            "in_chans": cfg.in_chans, "device": str(device),
            "dtype": str(autocast_dtype(device) or torch.float32).removeprefix("torch."),
            "batch_size": args.batch_size, "workers": workers, "encoder_only": encoder,
            "build": {"images_per_second": round(n / wall, 1), "seconds": round(wall, 2),
                      "cpu_seconds_per_image": round(cpu / n, 4),
                      "pipeline_images_per_second": build["images_per_second"],
                      "stage_seconds": build["stage_seconds"], "decode": build.get("decode"),
                      "decoded_on_device": build.get("decoded_on_device"),
                      "device_decode_fallbacks": build.get("device_decode_fallbacks")},
        }
        report["build_vs_encoder"] = round(report["build"]["images_per_second"] / encoder["images_per_second"], 3)
        _print(report)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
            print(f"wrote {args.out}")
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _pixels(path: Path) -> int:
    from PIL import Image
    with Image.open(path) as img:
        return img.width * img.height


def _machine(device) -> str:
    import platform

    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"


def _print(r: dict) -> None:
    b = r["build"]
    stages = ", ".join(f"{k} {v:.1f}" for k, v in b["stage_seconds"].items())
    print(f"\n{r['items']} items of {r['source']}, {r['model']} at {r['img_size']} px, {r['device']} {r['dtype']}, "
          f"batch {r['batch_size']}, {r['workers']} workers ({r['machine']}; load {r['load_average'][0]:.1f})")
    print(f"  {'encoder-only':<14} {r['encoder_only']['images_per_second']:>9.1f} img/s")
    print(f"  {'full build':<14} {b['images_per_second']:>9.1f} img/s  ({r['build_vs_encoder']:.0%} of encoder-only; "
          f"{b['cpu_seconds_per_image'] * 1e3:.1f} CPU-ms/img)")
    print(f"  stage seconds  {stages}")
    if b.get("decode") == "gpu":
        print(f"  JPEGs decoded on the device: {b['decoded_on_device']} ({b['device_decode_fallbacks']} rejected, "
              "decoded on the CPU)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.index_build", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
