"""Build (or extend) an index: the runner of pipeline.py's stages, then assembly and publication.

    reader   the source's sorted items (sources.open_source), cut into shards and chunks (pipeline.plan_chunks)
    mapper   worker processes read, hash, decode and resize each chunk to uint8 model pixels
    encoder  this thread stages full batches in pinned memory and encodes them on the device (bf16 on CUDA)
    writer   a thread collects the vectors and writes pieces; at the end the FAISS index is built from them

The work is saved as it goes: pieces (embeddings, per-item metadata, skipped files) are written atomically to
DIR/shards/<plan>/ at every shard's end and at least every `checkpoint_seconds`, so a build that is killed resumes
where it stopped, and, batches being cut the same way inside each shard and piece, ends with exactly the index an
uninterrupted build makes. The finished index is assembled in a new version folder and published by replacing
DIR/CURRENT (see store.py), so the previous index stays readable until then, whatever happens.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from vision_model import load_model, weights_hash
from vision_model.device import resolve_device
from vision_model.fileio import atomic_write
from vision_model.views import DEFAULT_VIEWS, views_of

from . import jpeg_batch, pipeline, store
from .index_types import choose_index, default_search_params, extend_index, write_new_index
from .pipeline import LEVEL, default_workers
from .sources import IMAGE_EXTENSIONS, ImageSource, open_source

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 2048
DEFAULT_MEMORY_BUDGET_MB = 4096
DEFAULT_BATCH_SIZE = 256
DEFAULT_CHECKPOINT_SECONDS = 20.0  # a killed build loses at most about this much work, plus the batches in flight
SHARDS_DIR = "shards"
LOCK_FILE = ".lock"


@dataclass
class BuildResult:
    index_dir: Path  # DIR
    version_dir: Path  # DIR/vNNNNNN, the published version
    manifest: dict
    added: int  # vectors this run put in the index
    skipped: list[dict] = field(default_factory=list)  # this run's skipped items: {"key", "source", "reason"}


# -- the public entry point ----------------------------------------------------------------------------------------
def build_index(source: str, out_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                index_type: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE, device: str = "auto",
                workers: int | None = None, add: bool = False,
                memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB, progress: bool = True,
                limit: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                max_image_pixels: int | None = None, views: str | None = None,
                on_shard: Callable[[int, int], None] | None = None,
                on_checkpoint: Callable[[int, int], None] | None = None,
                checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS, engine: str = "local",
                address: str | None = None, ray_actors: int | None = None,
                ray_gpus_per_actor: float | None = None, decode: str = "auto") -> BuildResult:
    """Index the images of SOURCE (see sources.py) into the index folder `out_dir`.

    model_dir: the encoder (default: the shipped model; with `add`, the model the index was built with).
    index_type: flat | ivf | ivfpq | hnsw | auto | a FAISS factory string (index_types.py). None means "flat"
        for a new index; with `add` it keeps the index and adds to it, while a type whose factory string
        differs from the index's rebuilds the FAISS index from all stored vectors.
    add: index only items whose (key, content sha256) the index lacks, appending ids; the model must be the
        index's own (same weights sha256). Without `add`, the index is rebuilt from SOURCE alone.
    limit: only the first `limit` items of SOURCE. max_image_pixels: larger images are skipped as possible
        decompression bombs (default vision_model.images.DEFAULT_MAX_PIXELS, Pillow's default; may be raised).
    views: each image embedded as the normalised sum of the embeddings of these views (vision_model.views: 1, flip,
        shift1, shift2). None means "1" for a new index; with `add`, the index's own, and another set is refused
        (the stored vectors would mix two embeddings).
    workers: decoding processes (default: one per core this process may use; 0: decode in this process).
    on_shard(shards_done, shards_total): called after each shard this run finishes.
    checkpoint_seconds: work is saved at least this often (and at every shard's end); on_checkpoint(items_done,
        items_total) is called after each save.
    engine: "local" (this process: decoding processes, one model) or "ray" (ray_engine.py: a Ray Data pipeline on
        the cluster at `address`, or on a local Ray; ray_actors / ray_gpus_per_actor size its pool of models). Both
        write the same pieces, so either resumes the other's build.
    decode: where JPEGs are decoded. "cpu": by the worker processes (Pillow, draft mode). "gpu": the workers read,
        hash and check them, and the encoder's device decodes them in batches (jpeg_batch.py: nvJPEG on CUDA; on a
        CPU device torchvision's decoder in this process, the same code, for tests); other formats, JPEGs it
        cannot take (CMYK, progressive: see jpeg_batch.py) and files it rejects are decoded on the CPU. "auto":
        "gpu" on a CUDA device with a hardware JPEG engine (A100, H100, H200, ...) when torchvision decodes JPEGs
        there and the source is files, else "cpu". Pieces of one decoder are never resumed by the other.
    """
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if decode not in ("auto", "cpu", "gpu"):
        raise ValueError(f"decode must be 'auto', 'cpu' or 'gpu', got {decode!r}")
    if decode == "gpu" and engine != "local":
        raise ValueError("--decode gpu needs --engine local (Ray tasks decode on the CPU)")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    started = time.perf_counter()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root):
        _remove_unpublished_versions(root)
        previous_dir = store.current_version(root)
        previous = store.read_manifest(previous_dir) if previous_dir is not None else None
        base = previous if add else None  # the index this run extends, if any
        if add and previous is None:
            log.info("%s holds no index yet: --add builds a new one", root)

        torch_device = resolve_device(device)
        workers = default_workers(torch_device) if workers is None else workers
        model = _load_encoder(model_dir, base, torch_device)
        model_sha = weights_hash(model.source_dir)
        if base is not None and model_sha != base["weights_sha256"]:
            raise ValueError(
                f"refusing to add to {root}: it was built with the model in {base['model_dir']} (weights sha256 "
                f"{base['weights_sha256'][:16]}…), but the model given is {model.source_dir} (weights sha256 "
                f"{model_sha[:16]}…). Embeddings of different models are not comparable: add with the index's "
                "own model, or build a new index without --add")
        views = _check_views(views, base, root)

        src = open_source(source, limit)
        if not src.items:
            raise ValueError(f"no images found in {source} (looked for {', '.join(IMAGE_EXTENSIONS)} files)")
        if index_type is not None:  # a bad type or budget should fail now, not after hours of encoding
            choose_index(index_type, (base["count"] if base else 0) + len(src), model.config.d_model,
                         memory_budget_mb)
        known = _indexed_contents(previous_dir) if base is not None else frozenset()
        decode = _resolve_decode(decode, src, torch_device, engine)
        plan = _plan_id(src, model, model_sha, shard_size, max_image_pixels, base, views, batch_size, torch_device,
                        decode)
        shard_dir = root / SHARDS_DIR / plan
        shard_dir.mkdir(parents=True, exist_ok=True)

        encode = functools.partial(_encode, decode=decode)
        if engine == "ray":  # imported only here: Ray is an optional extra
            from .ray_engine import encode_with_ray
            encode = functools.partial(encode_with_ray, address=address, actors=ray_actors,
                                       gpus_per_actor=ray_gpus_per_actor)
        threads = torch.get_num_threads()
        if torch_device.type == "cpu" and workers:  # the decoding processes have the other cores: no spinning
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - workers))
        try:
            encoded = encode(src, model, torch_device, known, shard_dir, plan, shard_size, batch_size, workers,
                              max_image_pixels, progress, on_shard, on_checkpoint, views, checkpoint_seconds)
        finally:
            torch.set_num_threads(threads)

        dtype = pipeline.autocast_dtype(torch_device) or torch.float32
        stats = {
            "mode": "add" if base is not None else "build",
            "source": src.spec,
            "items_seen": len(src),
            "indexed": encoded.indexed,
            "skipped": len(encoded.skipped),
            "already_indexed": encoded.already_indexed,
            "shards": encoded.shards_total,
            "resumed_shards": encoded.shards_resumed,
            "resumed_items": encoded.resumed_items,
            "pieces": len(encoded.pieces),
            "device": str(torch_device),
            "engine": engine,
            "dtype": str(dtype).removeprefix("torch."),
            "batch_size": batch_size,
            "workers": workers,
            "decode": decode,
        }
        if decode == "gpu":
            stats["decoded_on_device"] = sum(m.get("decoded", {}).get("device", 0) for m in encoded.metas)
            stats["device_decode_fallbacks"] = sum(m.get("decoded", {}).get("fallback", 0) for m in encoded.metas)
        if base is not None and encoded.indexed == 0:
            log.info("nothing new to add to %s", root)
            shutil.rmtree(root / SHARDS_DIR, ignore_errors=True)
            return BuildResult(root, previous_dir, previous, 0, encoded.skipped)
        if base is None and encoded.indexed == 0:
            reasons = "; ".join(f"{s['key']}: {s['reason']}" for s in encoded.skipped[:5])
            raise ValueError(f"none of the {len(src)} images of {source} could be indexed ({reasons})")

        version_dir = root / store.version_name(_next_version_number(root))
        manifest = _assemble(version_dir, src, model, model_sha, encoded, base, previous_dir, index_type,
                             memory_budget_mb, stats, started, views)
        _publish(root, version_dir)
        shutil.rmtree(root / SHARDS_DIR, ignore_errors=True)
        return BuildResult(root, version_dir, manifest, encoded.indexed, encoded.skipped)


def _check_views(views: str | None, base: dict | None, root: Path) -> str:
    base_views = base.get("views", DEFAULT_VIEWS) if base is not None else None
    views = views or base_views or DEFAULT_VIEWS
    views_of(views)  # a clear error for an unknown set
    if base is not None and views != base_views:
        raise ValueError(f"refusing to add to {root}: its images were embedded with the view set {base_views!r}, "
                         f"not {views!r}; add with --views {base_views} (or leave --views out), or build a new index "
                         "without --add")
    return views


def _load_encoder(model_dir, base: dict | None, device: torch.device):
    if model_dir is None and base is not None and Path(base["model_dir"]).is_dir():
        model_dir = base["model_dir"]  # extending an index: its own model, unless told otherwise
    return load_model(model_dir, device=device)


# -- locking and versions ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _exclusive_lock(root: Path) -> Iterator[None]:
    """One build at a time per index folder (readers need no lock)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(root / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another build is writing {root} right now; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _version_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and store.VERSION_NAME.match(p.name))


def _remove_unpublished_versions(root: Path) -> None:
    """Version folders CURRENT does not name: left by a build that crashed before or after publishing."""
    live = store.current_version(root)
    for folder in _version_folders(root):
        if folder != live:
            shutil.rmtree(folder, ignore_errors=True)


def _next_version_number(root: Path) -> int:
    numbers = [int(store.VERSION_NAME.match(p.name).group(1)) for p in _version_folders(root)]
    return max(numbers, default=0) + 1


def _publish(root: Path, version_dir: Path) -> None:
    """Point CURRENT at the new version (atomic rename), then retire the older ones."""
    _fsync(version_dir)
    atomic_write(root / store.CURRENT_FILE, f"{version_dir.name}\n".encode())
    _fsync(root)
    for folder in _version_folders(root):
        if folder != version_dir:
            shutil.rmtree(folder, ignore_errors=True)  # open readers keep their memory maps (POSIX)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _indexed_contents(version_dir: Path) -> frozenset[tuple[str, str]]:
    """(key, sha256) of every item of a published version."""
    db = sqlite3.connect(f"{(version_dir / store.METADATA_FILE).resolve().as_uri()}?mode=ro", uri=True)
    try:
        return frozenset(db.execute("SELECT key, sha256 FROM items"))
    finally:
        db.close()


def _resolve_decode(decode: str, src: ImageSource, device: torch.device, engine: str) -> str:
    """"cpu" or "gpu" for a build's `decode` argument (see build_index)."""
    files = bool(src.items) and src.items[0].array is None
    if decode == "auto":
        usable = engine == "local" and files and device.type == "cuda"
        return "gpu" if usable and jpeg_batch.hardware_engine(device) and jpeg_batch.available(device) else "cpu"
    if decode == "gpu" and not jpeg_batch.available(device):
        raise ValueError(f"--decode gpu: torchvision cannot decode JPEGs on {device} here (use --decode cpu)")
    return decode if files else "cpu"  # arrays are not decoded at all


def _plan_id(src: ImageSource, model, model_sha: str, shard_size: int, max_pixels: int | None,
             base: dict | None, views: str, batch_size: int, device: torch.device, decode: str = "cpu") -> str:
    """Fingerprint of everything a piece's content depends on: pieces of another plan are never reused. (The
    decoder is part of it: JPEGs are decoded at reduced size by the workers, see pipeline.prepare_item, or in
    batches on the device, see jpeg_batch.py; the pixels differ by the decoders' rounding.)"""
    keys = hashlib.sha256("\n".join(item.key for item in src.items).encode()).hexdigest()
    dtype = pipeline.autocast_dtype(device)
    decoder = "draft" if decode == "cpu" else {"device": device.type, "max_pixels": jpeg_batch.GPU_MAX_PIXELS,
                                               "progressive": jpeg_batch.PROGRESSIVE_ON_DEVICE}
    plan = {"format": store.FORMAT_VERSION, "pieces": 1, "decode": decoder, "weights": model_sha,
            "config": model.config.to_dict(), "source": src.spec, "keys": keys, "shard_size": shard_size,
            "batch_size": batch_size, "dtype": str(dtype or torch.float32), "views": views, "max_pixels": max_pixels,
            "base": None if base is None else [base["version"], base["count"]]}
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


# -- the runner: reader -> mapper (worker processes) -> encoder (this thread, the device) -> writer (a thread) -------
@dataclass
class _Encoded:
    pieces: list[Path]  # in item order, covering every item of the source
    metas: list[dict]
    indexed: int = 0
    already_indexed: int = 0
    skipped: list[dict] = field(default_factory=list)
    shards_total: int = 0
    shards_resumed: int = 0  # whole shards done before this run
    resumed_items: int = 0  # items done before this run
    seconds: float = 0.0  # this run's pipeline wall time


class _Piece:
    """The piece the main thread is filling: items [start, ...) with their outcome."""

    def __init__(self, start: int):
        self.start, self.indexed, self.skipped, self.already = start, [], [], 0
        self.seconds = dict.fromkeys(("read", "decode", "preprocess", "wait"), 0.0)
        self.opened = time.perf_counter()

    def record(self, item, record: tuple) -> bool:
        """Note one item's outcome (a pipeline.Chunk record); True if it has pixels to encode (or a JPEG to decode:
        its `blank` is filled in once decoded)."""
        if record[0] in ("ok", "jpeg"):
            self.indexed.append({"key": item.key, "label": item.label, "label_name": item.label_name,
                                 "sha256": record[1], "width": record[2], "height": record[3],
                                 "blank": record[4] if record[0] == "ok" else None})
            return True
        if record[0] == "skip":
            log.info("skipping %s: %s", item.key, record[1])
            self.skipped.append({"key": item.key, "reason": record[1]})
        else:
            self.already += 1
        return False

    def meta(self, plan: str, stop: int) -> dict:
        """The piece's metadata, items [start, stop); the writer adds the encode and write seconds."""
        return {"plan": plan, "start": self.start, "stop": stop, "indexed": self.indexed, "skipped": self.skipped,
                "already_indexed": self.already, "wall": time.perf_counter() - self.opened, "seconds": self.seconds}


def _resume_point(shard_dir: Path, plan: str, n_items: int) -> tuple[list[Path], list[dict]]:
    """The pieces of this plan that follow each other from item 0, and their metadata; other pieces are removed."""
    found = {}
    for path in shard_dir.glob("piece-*.npz"):
        meta = pipeline.read_piece_meta(path)
        if (meta is not None and meta.get("plan") == plan and 0 <= meta["start"] < meta["stop"] <= n_items
                and len(meta["indexed"]) + len(meta["skipped"]) + meta["already_indexed"]
                == meta["stop"] - meta["start"]):
            found[meta["start"]] = (path, meta)
    chain, metas, position = [], [], 0
    while position in found:
        path, meta = found.pop(position)
        chain.append(path)
        metas.append(meta)
        position = meta["stop"]
    for path in set(shard_dir.iterdir()) - set(chain):  # stale: another run's tail, temporary files
        path.unlink(missing_ok=True)
    return chain, metas


def _encode(src: ImageSource, model, device: torch.device, known: frozenset, shard_dir: Path, plan: str,
            shard_size: int, batch_size: int, workers: int, max_pixels: int | None, progress: bool,
            on_shard: Callable[[int, int], None] | None, on_checkpoint: Callable[[int, int], None] | None,
            views: str, checkpoint_seconds: float, decode: str = "cpu") -> _Encoded:
    items, n = src.items, len(src.items)
    result = _resume(shard_dir, plan, n, shard_size)
    position = result.resumed_items
    skipped_count = sum(len(m["skipped"]) for m in result.metas)
    bar = _progress_bar(n, position, skipped_count, progress)
    started = time.perf_counter()
    decoder = jpeg_batch.JpegBatchDecoder(model.config, device, max_pixels) if decode == "gpu" else None
    encoder = pipeline.BatchEncoder(model, device, batch_size, views, decoder=decoder)
    writer = pipeline.PieceWriter(model.config.d_model, _on_written(n, shard_size, on_shard, on_checkpoint))
    ranges = pipeline.plan_chunks(n, position, shard_size, pipeline.chunk_size_for(items))
    chunks = pipeline.decoded_chunks(items, ranges, model.config, known, max_pixels, workers,
                                     device_decode=jpeg_batch.GPU_MAX_PIXELS if decoder is not None else None)
    piece = _Piece(position)
    buffer, fill, jobs = encoder.buffer(), 0, []  # jobs: the batch's JPEGs for the device decoder

    def encode_batch() -> None:
        nonlocal buffer, fill, jobs
        if fill:
            writer.put_batch(encoder.encode(fill, jobs))
            buffer, fill, jobs = encoder.buffer(), 0, []

    def close_piece(stop: int) -> None:
        nonlocal piece
        encode_batch()
        piece = _close_piece(result, writer, shard_dir, plan, piece, stop)

    try:
        with writer:
            while True:
                waited = time.perf_counter()
                chunk = next(chunks, None)
                piece.seconds["wait"] += time.perf_counter() - waited
                if chunk is None:
                    break
                for stage in ("read", "decode", "preprocess"):
                    piece.seconds[stage] += chunk.seconds[stage]
                copied = 0  # chunk.pixels[:copied] are in buffers already; the next ones go to buffer[fill - pending:]
                pending = 0
                for offset, record in enumerate(chunk.records):
                    at = chunk.start + offset
                    if piece.record(items[at], record):
                        if record[0] == "jpeg":  # its slot stays empty: the decode thread fills it on the device
                            if pending:
                                buffer[fill - pending:fill] = chunk.pixels[copied:copied + pending]
                                copied, pending = copied + pending, 0
                            _, _, width, height, orientation, begin, length = record
                            jobs.append(jpeg_batch.JpegJob(fill, chunk.encoded[begin:begin + length], width, height,
                                                           orientation, piece.indexed[-1]))
                        else:
                            pending += 1
                        fill += 1
                        if fill == batch_size:
                            buffer[fill - pending:fill] = chunk.pixels[copied:copied + pending]
                            copied, pending = copied + pending, 0
                            encode_batch()
                            if time.perf_counter() - piece.opened >= checkpoint_seconds:
                                close_piece(at + 1)
                    elif record[0] == "skip":
                        skipped_count += 1
                    if (at + 1) % shard_size == 0 or at + 1 == n:  # a shard ends: its batches end with it
                        if pending:
                            buffer[fill - pending:fill] = chunk.pixels[copied:copied + pending]
                            copied, pending = copied + pending, 0
                        if piece.start < at + 1:
                            close_piece(at + 1)
                if pending:
                    buffer[fill - pending:fill] = chunk.pixels[copied:copied + pending]
                bar.update(chunk.stop - chunk.start)
                bar.set_postfix(skipped=skipped_count, refresh=False)
    finally:
        del chunks  # stops the worker processes
        encoder.close()
        bar.close()
    result.seconds = time.perf_counter() - started
    return _add_totals(result, src)


# -- what every engine's runner shares: where to resume, progress, totals --------------------------------------------
def _resume(shard_dir: Path, plan: str, n_items: int, shard_size: int) -> _Encoded:
    """The result so far: this plan's finished pieces; resumed_items is where this run starts."""
    pieces, metas = _resume_point(shard_dir, plan, n_items)
    position = metas[-1]["stop"] if metas else 0
    return _Encoded(pieces, metas, shards_total=-(-n_items // shard_size), shards_resumed=position // shard_size,
                    resumed_items=position)


def _progress_bar(n_items: int, position: int, skipped: int, progress: bool) -> tqdm:
    bar = tqdm(total=n_items, initial=position, unit="img", desc="indexing", disable=not progress,
               dynamic_ncols=True, smoothing=0.05)  # img/s and the ETA; skipped in the postfix
    bar.set_postfix(skipped=skipped)
    return bar


def _on_written(n_items: int, shard_size: int, on_shard: Callable[[int, int], None] | None,
                on_checkpoint: Callable[[int, int], None] | None) -> Callable[[dict], None]:
    """The callback run after each piece is written: on_checkpoint, and on_shard where a shard ends."""
    def written(meta: dict) -> None:
        stop = meta["stop"]
        if on_checkpoint is not None:
            on_checkpoint(stop, n_items)
        if on_shard is not None and (stop % shard_size == 0 or stop == n_items):
            on_shard(-(-stop // shard_size), -(-n_items // shard_size))
    return written


def _close_piece(result: _Encoded, writer: pipeline.PieceWriter, shard_dir: Path, plan: str, piece: _Piece,
                 stop: int) -> _Piece:
    """Hand the piece (items up to `stop`, its batches already queued) to the writer; the next piece."""
    meta = piece.meta(plan, stop)
    path = pipeline.piece_path(shard_dir, piece.start, stop)
    writer.put_piece(path, meta)
    result.pieces.append(path)
    result.metas.append(meta)
    return _Piece(stop)


def _add_totals(result: _Encoded, src: ImageSource) -> _Encoded:
    """Totals over every piece, earlier runs' included."""
    for meta in result.metas:
        result.indexed += len(meta["indexed"])
        result.already_indexed += meta["already_indexed"]
        result.skipped.extend({"key": s["key"], "source": src.spec, "reason": s["reason"]} for s in meta["skipped"])
    return result


def _stage_stats(encoded: _Encoded, assemble_seconds: float, n_items: int) -> dict:
    """Seconds per stage and throughput over the whole build (every run that made its pieces)."""
    stages = {stage: sum(m["seconds"].get(stage, 0.0) for m in encoded.metas) for stage in pipeline.STAGES}
    stages["assemble"] = assemble_seconds
    wall = sum(m["wall"] for m in encoded.metas)
    this_run = n_items - encoded.resumed_items
    return {
        "pipeline_seconds": round(wall, 3),
        "images_per_second": round(n_items / wall, 1) if wall else None,
        "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "this_run": {"items": this_run, "seconds": round(encoded.seconds, 3),
                     "images_per_second": round(this_run / encoded.seconds, 1) if encoded.seconds else None},
    }


# -- assembly ------------------------------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE items (
    id INTEGER PRIMARY KEY,   -- FAISS id and row of embeddings.npy
    key TEXT NOT NULL,        -- relative path, or fashion-mnist:SPLIT/NNNNNN
    label INTEGER,            -- index into the manifest's label_names; NULL when unknown
    label_name TEXT,
    sha256 TEXT NOT NULL,     -- of the file's bytes (of the array's bytes for Fashion-MNIST)
    width INTEGER,            -- original size
    height INTEGER,
    source TEXT NOT NULL,     -- the SOURCE the item came from: folder path, imagefolder:DIR or fashion-mnist:SPLIT
    blank INTEGER             -- 1: no content (one colour, vision_model.images.is_blank); NULL: not recorded
);
CREATE INDEX items_key ON items (key);
"""


def _assemble(version_dir: Path, src: ImageSource, model, model_sha: str, encoded: _Encoded, base: dict | None,
              base_dir: Path | None, index_type: str | None, memory_budget_mb: float, stats: dict,
              started: float, views: str) -> dict:
    """Write a complete version folder (not yet live)."""
    assembling = time.perf_counter()
    version_dir.mkdir()
    d = model.config.d_model
    n_base = base["count"] if base is not None else 0
    n_total = n_base + encoded.indexed
    label_names = list(base["label_names"]) if base is not None else []
    label_names += [name for name in src.label_names if name not in label_names]
    label_of = {name: i for i, name in enumerate(label_names)}

    # embeddings: the base index's rows, then every shard's, in order
    vectors = np.lib.format.open_memmap(version_dir / store.EMBEDDINGS_FILE, mode="w+", dtype=np.float32,
                                        shape=(n_total, d))
    row = 0
    if base is not None:
        old = np.load(base_dir / store.EMBEDDINGS_FILE, mmap_mode="r")
        for start in range(0, n_base, 65_536):
            stop = min(start + 65_536, n_base)
            vectors[start:stop] = old[start:stop]
        row = n_base
    rows = []
    for path in encoded.pieces:
        embeddings, meta = pipeline.read_piece(path)
        if embeddings.shape != (len(meta["indexed"]), d):
            raise RuntimeError(f"shard {path} is damaged: delete {path.parent} and build again")
        vectors[row:row + len(embeddings)] = embeddings
        for item in meta["indexed"]:
            name = item["label_name"]
            rows.append((row, item["key"], label_of.get(name) if name is not None else None, name, item["sha256"],
                         item["width"], item["height"], src.spec, item.get("blank")))
            row += 1
    vectors.flush()
    del vectors
    vectors = np.load(version_dir / store.EMBEDDINGS_FILE, mmap_mode="r")

    # metadata: a copy of the base table plus the new rows
    db_path = version_dir / store.METADATA_FILE
    if base is not None:
        shutil.copyfile(base_dir / store.METADATA_FILE, db_path)
    db = sqlite3.connect(db_path)
    try:
        if base is None:
            db.executescript(_SCHEMA)
        store.add_missing_columns(db)  # a base index from before the blank column
        db.executemany(f"INSERT INTO items ({', '.join(store.METADATA_COLUMNS)}) VALUES "
                       f"({', '.join('?' * len(store.METADATA_COLUMNS))})", rows)
        db.commit()
    finally:
        db.close()

    # FAISS: extend the base index, or build one of the requested type over all vectors
    choice = None if index_type is None and base is not None else \
        choose_index(index_type or "flat", n_total, d, memory_budget_mb)
    if base is not None and (choice is None or choice.factory == base["index_factory"]):
        index, storage = extend_index(base_dir / store.INDEX_FILE, vectors, n_base, version_dir / store.INDEX_FILE,
                                      version_dir.parent / SHARDS_DIR / "ivf")
        kind, factory, reason = base["index_type"], base["index_factory"], base["index_choice"]
    else:
        index, storage = write_new_index(choice, vectors, version_dir / store.INDEX_FILE,
                                         version_dir.parent / SHARDS_DIR / "ivf")
        kind, factory, reason = choice.index_type, choice.factory, choice.reason

    # skipped files: this run's, plus the base's that this run neither indexed nor tried again
    retried = {(src.spec, r[1]) for r in rows} | {(s["source"], s["key"]) for s in encoded.skipped}
    skipped = [s for s in (base["skipped"] if base is not None else []) if (s["source"], s["key"]) not in retried]
    skipped += encoded.skipped
    stats = dict(stats, **_stage_stats(encoded, time.perf_counter() - assembling, len(src)),
                 seconds=round(time.perf_counter() - started, 3),
                 finished=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    manifest = {
        "format": store.FORMAT,
        "format_version": store.FORMAT_VERSION,
        "version": version_dir.name,
        "count": n_total,
        "embedding_dim": d,
        "granularity": f"level {LEVEL}",
        "level": LEVEL,
        "normalization": "l2",
        "views": views,
        "view_count": len(views_of(views)),
        "metric": "inner_product",
        "dtype": "float32",
        "index_type": kind,
        "index_factory": factory,
        "index_choice": reason,
        "index_storage": storage,
        "search_params": default_search_params(index),
        "model_name": model.config.name,
        "model_dir": str(Path(model.source_dir).resolve()),
        "weights_sha256": model_sha,
        "model_config": model.config.to_dict(),
        "label_names": label_names,
        "sources": list(dict.fromkeys((base["sources"] if base is not None else []) + [src.spec])),
        "files": {"index": store.INDEX_FILE, "embeddings": store.EMBEDDINGS_FILE, "metadata": store.METADATA_FILE},
        "build": stats,
        "history": (base["history"] if base is not None else []) + [stats],
        "skipped": skipped,
    }
    atomic_write(version_dir / store.MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    for path in version_dir.iterdir():  # the index, its .ivfdata if on disk, embeddings, metadata, manifest
        _fsync(path)
    return manifest
