"""Photo-sized JPEGs with real-looking content, made quickly in parallel, for index-build benchmarks.

Each photo is a crop of a wallpaper (the ones installed under /usr/share/backgrounds, when there are any) or a
procedural scene (smooth colour fields and shapes) where there are none, resized to a camera size between
640x480 and 4000x3000, with sensor-like noise added, saved as a quality-90 JPEG. The content is smooth with
fine grain, as photos are, so the files have photo-like sizes (bytes per pixel) and decode costs.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

WALLPAPER_DIR = Path("/usr/share/backgrounds")
# camera sizes (w, h), all 4:3 or 3:2, 0.3 to 12 MP
PHOTO_SIZES = [(640, 480), (1024, 768), (1600, 1200), (2048, 1536), (2592, 1944), (3000, 2000), (3264, 2448),
               (4000, 3000)]
NOISE_TILE = 509  # a prime, so the tiled grain does not line up with JPEG's 8x8 blocks
QUALITY = 90


def wallpapers(folder: Path = WALLPAPER_DIR) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.is_file())


def sizes_for(count: int, min_pixels: int = 0, seed: int = 0) -> list[tuple[int, int]]:
    """`count` camera sizes drawn from PHOTO_SIZES (those of at least min_pixels), reproducibly."""
    choices = [s for s in PHOTO_SIZES if s[0] * s[1] >= min_pixels]
    if not choices:
        raise ValueError(f"no photo size has {min_pixels} pixels or more (largest: 4000x3000)")
    rng = np.random.default_rng(seed)
    return [choices[i] for i in rng.integers(0, len(choices), count)]


def _scene(rng: np.random.Generator) -> Image.Image:
    """A procedural stand-in for a photo: a blurred colour field with a few shapes, 512x384."""
    w, h = 512, 384
    field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 9)):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, 250)), y0 + int(rng.integers(20, 200))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return img.filter(ImageFilter.GaussianBlur(2))


def _make_one(job: tuple[Path, tuple[int, int], int, Path | None]) -> int:
    path, (w, h), seed, wallpaper = job
    rng = np.random.default_rng(seed)
    if wallpaper is not None:
        with Image.open(wallpaper) as src:
            src = src.convert("RGB")
            # a random crop of 40-100% of the wallpaper, at the photo's aspect ratio
            frac = rng.uniform(0.4, 1.0)
            cw = min(src.width, int(src.height * w / h)) * frac
            ch = cw * h / w
            x0, y0 = rng.uniform(0, src.width - cw), rng.uniform(0, src.height - ch)
            base = src.resize((w, h), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    else:
        base = _scene(rng).resize((w, h), Image.Resampling.BILINEAR)
    tile = rng.integers(-12, 13, (NOISE_TILE, NOISE_TILE, 3), dtype=np.int16)
    reps = (-(-h // NOISE_TILE), -(-w // NOISE_TILE), 1)
    noisy = np.asarray(base, dtype=np.int16) + np.tile(tile, reps)[:h, :w]
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=QUALITY)
    return path.stat().st_size


def make_photos(folder: str | os.PathLike, count: int, min_pixels: int = 0, seed: int = 0,
                workers: int | None = None, use_wallpapers: bool = True) -> list[Path]:
    """Write `count` JPEGs photo-NNNNNN.jpg into `folder` (kept if already there) and return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    walls = wallpapers() if use_wallpapers else []
    rng = np.random.default_rng(seed)
    jobs = []
    for i, size in enumerate(sizes_for(count, min_pixels, seed)):
        path = folder / f"photo-{i:06d}.jpg"
        wall = walls[int(rng.integers(0, len(walls)))] if walls else None
        if not path.exists():
            jobs.append((path, size, seed * 1_000_003 + i, wall))
    if jobs:
        workers = workers or len(os.sched_getaffinity(0))
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_make_one, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    return [folder / f"photo-{i:06d}.jpg" for i in range(count)]
