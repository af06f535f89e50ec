"""Decode a folder of images once into a training cache: a memory-mapped uint8 array at the training resolution.

    cache = build_cache("/usr/share/openclipart/png", "runs/clipart/cache", size=96)
    cache.images        # (n, 3, 96, 96) uint8, memory-mapped: read by batch, never decoded again
    cache.keys          # relative POSIX paths, in the folder source's sorted order
    cache.skipped       # {key: reason} of files that could not be used (unreadable, too many pixels)
    cache.duplicates    # {key: key kept}: the same decoded picture seen earlier under another path

A cache folder holds images.npy (capacity rows; the first n are valid), state.json (progress, rewritten atomically
every few hundred files and at the end) and, once complete, index.json (keys, skipped, duplicates, size). A build
that is killed resumes at the next unprocessed file of state.json. The folder's files are listed with
`index.sources.open_source`, so a cache and an index of the same folder name the same files by the same keys.

Transparent images are composited on black or white, whichever contrasts with the picture, and fitted to size x size
in the config's crop style ('pad': the long side fitted, the rest padded with the border colour; 'center': short side,
centre crop). Duplicates are found by the sha256 of the decoded full-size pixels (clip art collections file one
picture under several topics); the first in key order is kept.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from index.sources import open_source
from vision_model.images import UnreadableImage, decode_image
from vision_model.fileio import atomic_write
from vision_model.preprocess import fit_to_size, to_mode

IMAGES_FILE, STATE_FILE, INDEX_FILE = "images.npy", "state.json", "index.json"
DEFAULT_MAX_PIXELS = 40_000_000  # larger files are skipped (reported): decoding one costs seconds and >100 MB
SAVE_EVERY = 256  # files between progress saves


@dataclass
class ImageCache:
    directory: Path
    images: np.ndarray  # (n, c, size, size) uint8 memmap
    keys: list[str]
    size: int
    skipped: dict[str, str] = field(default_factory=dict)
    duplicates: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.keys)


def is_cache(directory: str | os.PathLike) -> bool:
    return (Path(directory) / INDEX_FILE).is_file() and (Path(directory) / IMAGES_FILE).is_file()


def open_cache(directory: str | os.PathLike) -> ImageCache:
    """A complete cache folder, its array memory-mapped read-only."""
    directory = Path(directory)
    if not is_cache(directory):
        raise FileNotFoundError(f"{directory} is not a complete image cache (no {INDEX_FILE} / {IMAGES_FILE})")
    meta = json.loads((directory / INDEX_FILE).read_text())
    images = np.load(directory / IMAGES_FILE, mmap_mode="r")[:len(meta["keys"])]
    return ImageCache(directory, images, meta["keys"], meta["size"], meta.get("skipped", {}),
                      meta.get("duplicates", {}), meta.get("source", ""))


def decode_for_cache(data: bytes, size: int, crop: str, max_pixels: int) -> tuple[str, np.ndarray]:
    """(sha256 of the decoded RGB pixels, (3, size, size) uint8) of an encoded file; raises UnreadableImage.

    Decoding is index.sources.decode_image's and mode handling (transparency on a contrasting background,
    palettes, 16-bit) preprocess.to_mode's: the project's one decoder (vision_model/images.py).
    """
    img = to_mode(decode_image(data, max_pixels), 3)
    digest = hashlib.sha256(img.tobytes() + f"{img.width}x{img.height}".encode()).hexdigest()
    img.thumbnail((4 * size, 4 * size), Image.Resampling.BOX)  # big drawings: shrink cheaply first, then antialias
    x = fit_to_size(TF.pil_to_tensor(img), size, crop)
    return digest, x.numpy()


def _work(args) -> tuple[str, np.ndarray | None, str | None]:
    path, size, crop, max_pixels = args
    try:
        data = Path(path).read_bytes()
        digest, x = decode_for_cache(data, size, crop, max_pixels)
        return digest, x, None
    except UnreadableImage as e:
        return "", None, e.reason
    except OSError as e:
        return "", None, f"cannot read file: {e.strerror or e}"


def _save_state(directory: Path, state: dict) -> None:
    atomic_write(directory / STATE_FILE, json.dumps(state).encode())


def build_cache(folder: str | os.PathLike, directory: str | os.PathLike, size: int, crop: str = "pad",
                max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None, limit: int | None = None,
                log: Callable[[str], None] = print) -> ImageCache:
    """Decode every image under `folder` (recursively) into a cache in `directory`; resume an interrupted build;
    return the cache as it is if it is already complete (for the same folder and size)."""
    directory = Path(directory)
    source = open_source(str(folder), limit)
    if is_cache(directory):
        cache = open_cache(directory)
        if cache.size != size or (cache.source and cache.source != source.spec):
            raise ValueError(f"{directory} caches {cache.source} at {cache.size} px, not {source.spec} at {size} px: "
                             "use another cache folder")
        return cache
    directory.mkdir(parents=True, exist_ok=True)
    items = source.items
    state_path = directory / STATE_FILE
    fresh = {"source": source.spec, "size": size, "crop": crop, "files": len(items), "next": 0, "keys": [],
             "hashes": [], "skipped": {}, "duplicates": {}}
    state = json.loads(state_path.read_text()) if state_path.is_file() else fresh
    if (state["source"], state["size"], state["crop"], state["files"]) != (source.spec, size, crop, len(items)):
        raise ValueError(f"{directory} holds an unfinished cache of {state['source']} ({state['files']} files, "
                         f"{state['size']} px, crop {state['crop']}): use another cache folder or delete it")
    shape = (max(len(items), 1), 3, size, size)
    images_path = directory / IMAGES_FILE
    if state["next"] == 0 or not images_path.is_file():
        state = fresh
        images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=shape)
    else:
        images = np.load(images_path, mmap_mode="r+")
        log(f"resuming the cache of {source.spec} at file {state['next']}/{len(items)}")
    seen = {h: k for h, k in zip(state["hashes"], state["keys"])}
    todo = [(str(item.path), size, crop, max_pixels) for item in items[state["next"]:]]
    workers = workers or min(16, os.cpu_count() or 1)
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(todo) > 64 else None
    results = pool.map(_work, todo, chunksize=16) if pool else map(_work, todo)
    try:
        for i, (digest, x, reason) in enumerate(results, start=state["next"]):
            key = items[i].key
            if reason is not None:
                state["skipped"][key] = reason
            elif digest in seen:
                state["duplicates"][key] = seen[digest]
            else:
                images[len(state["keys"])] = x
                seen[digest] = key
                state["keys"].append(key)
                state["hashes"].append(digest)
            state["next"] = i + 1
            if state["next"] % SAVE_EVERY == 0:
                images.flush()
                _save_state(directory, state)
                log(f"  cached {state['next']}/{len(items)} files ({len(state['keys'])} kept)")
    finally:
        images.flush()
        _save_state(directory, state)
        if pool:
            pool.shutdown(cancel_futures=True)
    del images
    meta = {"source": source.spec, "size": size, "crop": crop, "keys": state["keys"], "skipped": state["skipped"],
            "duplicates": state["duplicates"]}
    atomic_write(directory / INDEX_FILE, json.dumps(meta).encode())
    cache = open_cache(directory)
    log(f"cache {directory}: {len(cache)} images at {size} px from {len(items)} files, {len(cache.skipped)} skipped, "
        f"{len(cache.duplicates)} duplicates dropped")
    for key, reason in list(cache.skipped.items())[:20]:
        log(f"  skipped {key}: {reason}")
    return cache


def topic_of(key: str) -> str | None:
    """The top-level folder of a cache key ('animals/birds/owl.png' -> 'animals'); None for a file at the root."""
    head, sep, _ = key.partition("/")
    return head if sep else None


def uint8_batch(cache: ImageCache, rows, device) -> torch.Tensor:
    """Rows of the cache as a (b, c, s, s) uint8 tensor on `device` (sorted reads from the memmap)."""
    rows = np.asarray(rows)
    order = np.argsort(rows)
    x = np.empty((len(rows),) + cache.images.shape[1:], dtype=np.uint8)
    x[order] = cache.images[rows[order]]
    x = torch.from_numpy(x)
    if torch.device(device).type == "cuda":  # a copy from pinned memory does not wait for the GPU's queue to drain
        x = x.pin_memory()
    return x.to(device, non_blocking=True)
