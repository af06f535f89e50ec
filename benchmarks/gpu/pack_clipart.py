"""Pack the distinct openclipart-png images for the GPU machine, and unpack them there into a training cache.

    python3 -m benchmarks.gpu.pack_clipart                     # here: decode, deduplicate, compress (minutes)
    python3 -m benchmarks.gpu.pack_clipart --unpack DIR        # there: a training cache (training/cache.py) in DIR

The pack (default /work/main/.data/clipart/, an ignored folder the coordinator carries) holds images.npy.xz, the
cache's (n, 3, size, size) uint8 array compressed with LZMA (clip art is mostly flat colour: about a seventh of
its raw size), and index.json (keys = paths relative to the source, skipped files with reasons, duplicates
dropped). Keys keep the topic folder, which evaluation uses as the held-out label; training never reads it.
"""
from __future__ import annotations

import argparse
import lzma
import shutil
from pathlib import Path

import numpy as np

from training.cache import IMAGES_FILE, INDEX_FILE, build_cache, is_cache, open_cache
from vision_model.config import get_config
from vision_model.fileio import atomic_write

SOURCE = "/usr/share/openclipart/png"
PACK_DIR = "/work/main/.data/clipart"
PACKED_IMAGES = "images.npy.xz"


def pack(source: str, pack_dir: Path, work: Path, size: int, max_pixels: int, workers: int | None) -> Path:
    cache = build_cache(source, work, size, "pad", max_pixels=max_pixels, workers=workers)
    pack_dir.mkdir(parents=True, exist_ok=True)
    images = np.ascontiguousarray(cache.images)
    tmp = pack_dir / (PACKED_IMAGES + ".tmp")
    with lzma.open(tmp, "wb", preset=6) as f:
        np.save(f, images)
    tmp.replace(pack_dir / PACKED_IMAGES)
    shutil.copyfile(work / INDEX_FILE, pack_dir / INDEX_FILE)
    total = sum(p.stat().st_size for p in pack_dir.iterdir())
    print(f"pack {pack_dir}: {len(cache)} distinct images at {size} px ({len(cache.skipped)} files skipped, "
          f"{len(cache.duplicates)} duplicates dropped), {total / 1e6:.1f} MB")
    return pack_dir


def unpack(pack_dir: str | Path, cache_dir: str | Path) -> Path:
    """A training cache in cache_dir from a pack (kept as it is if already unpacked)."""
    pack_dir, cache_dir = Path(pack_dir), Path(cache_dir)
    if is_cache(cache_dir):
        return cache_dir
    if not (pack_dir / PACKED_IMAGES).is_file():
        raise FileNotFoundError(f"{pack_dir} holds no {PACKED_IMAGES}: run `python3 -m benchmarks.gpu.pack_clipart`")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with lzma.open(pack_dir / PACKED_IMAGES, "rb") as f:
        images = np.load(f)
    np.save(cache_dir / IMAGES_FILE, images)
    atomic_write(cache_dir / INDEX_FILE, (pack_dir / INDEX_FILE).read_bytes())  # last: marks it complete
    open_cache(cache_dir)
    return cache_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=SOURCE)
    p.add_argument("--pack", default=PACK_DIR, help="the pack folder (written, or read with --unpack)")
    p.add_argument("--work", default="/tmp/clipart_cache", help="where the full cache is built (resumable)")
    p.add_argument("--size", type=int, default=get_config("matmamba_vision_clipart").img_size)
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="larger files are skipped and reported")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--unpack", metavar="DIR", help="unpack the pack into a training cache in DIR")
    args = p.parse_args(argv)
    if args.unpack:
        print(f"cache {unpack(args.pack, args.unpack)}: {len(open_cache(args.unpack))} images")
    else:
        pack(args.source, Path(args.pack), Path(args.work), args.size, args.max_pixels, args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
