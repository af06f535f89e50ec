"""Build (or extend) an index: decode images in threads, encode them at full granularity, store and publish.

The work is cut into fixed shards of the source's sorted items. Each finished shard (embeddings, per-item
metadata, skipped files) is written atomically to DIR/shards/<plan>/, so a build that is killed resumes where
it stopped, and — batches being cut the same way inside each shard — ends with exactly the index an
uninterrupted build makes. The finished index is assembled in a new version folder and published by
replacing DIR/CURRENT (see store.py), so the previous index stays readable until then, whatever happens.
"""
from __future__ import annotations

import collections
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import logging
import os
import shutil
import sqlite3
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from vision_model import load_model, weights_hash
from vision_model.preprocess import normalize_uint8, preprocess_image
from vision_model.views import DEFAULT_VIEWS, black, embed_views, views_of

from . import store
from .index_types import choose_index, default_search_params, extend_index, write_new_index
from .sources import (IMAGE_EXTENSIONS, ImageSource, SourceItem, UnreadableImage, decode_item, open_source,
                      read_item)

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 2048
DEFAULT_MEMORY_BUDGET_MB = 4096
DEFAULT_BATCH_SIZE = 256
SHARDS_DIR = "shards"
LOCK_FILE = ".lock"
LEVEL = 1  # indexes always hold full-granularity embeddings; queries may use any submodel


@dataclass
class BuildResult:
    index_dir: Path  # DIR
    version_dir: Path  # DIR/vNNNNNN, the published version
    manifest: dict
    added: int  # vectors this run put in the index
    skipped: list[dict] = field(default_factory=list)  # this run's skipped items: {"key", "source", "reason"}


@dataclass
class _Prepared:
    """What a decode worker made of one item."""
    item: SourceItem
    sha256: str | None = None
    width: int = 0
    height: int = 0
    pixels: torch.Tensor | None = None  # model input (c, h, w)
    skip_reason: str | None = None
    already_indexed: bool = False


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# -- the public entry point ----------------------------------------------------------------------------------------
def build_index(source: str, out_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                index_type: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE, device: str = "auto",
                workers: int | None = None, add: bool = False,
                memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB, progress: bool = True,
                limit: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                max_image_pixels: int | None = None, views: str | None = None,
                on_shard: Callable[[int, int], None] | None = None, engine: str = "local",
                address: str | None = None, ray_actors: int | None = None,
                ray_gpus_per_actor: float | None = None) -> BuildResult:
    """Index the images of SOURCE (see sources.py) into the index folder `out_dir`.

    model_dir: the encoder (default: the shipped model; with `add`, the model the index was built with).
    index_type: flat | ivf | ivfpq | hnsw | auto | a FAISS factory string (index_types.py). None means "flat"
        for a new index; with `add` it keeps the index and adds to it, while a type whose factory string
        differs from the index's rebuilds the FAISS index from all stored vectors.
    add: index only items whose (key, content sha256) the index lacks, appending ids; the model must be the
        index's own (same weights sha256). Without `add`, the index is rebuilt from SOURCE alone.
    limit: only the first `limit` items of SOURCE. max_image_pixels: larger images are skipped as possible
        decompression bombs (default and upper bound: Pillow's Image.MAX_IMAGE_PIXELS).
    views: each image embedded as the normalised sum of the embeddings of these views (vision_model.views: 1, flip,
        shift1, shift2). None means "1" for a new index; with `add`, the index's own, and another set is refused
        (the stored vectors would mix two embeddings).
    on_shard(shards_done, shards_total): called after each shard this run writes.
    engine: "local" (this process: decoding threads, one model) or "ray" (ray_engine.py: a Ray Data pipeline on
        the cluster at `address`, or on a local Ray; ray_actors / ray_gpus_per_actor size its pool of models).
    """
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    started = time.perf_counter()
    workers = workers or default_workers()
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
        plan = _plan_id(src, model, model_sha, shard_size, max_image_pixels, base, views)
        shard_dir = root / SHARDS_DIR / plan
        shard_dir.mkdir(parents=True, exist_ok=True)

        with warnings.catch_warnings():
            # Pillow only warns about images between its pixel limit and twice that: make it an error to skip
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            encode, extra = _encode_in_shards, {}
            if engine == "ray":
                from .ray_engine import encode_in_shards as encode
                extra = {"address": address, "actors": ray_actors, "gpus_per_actor": ray_gpus_per_actor}
            encoded = encode(src, model, torch_device, known, shard_dir, plan, shard_size, batch_size,
                             workers, max_image_pixels, progress, on_shard, views, **extra)

        stats = {
            "mode": "add" if base is not None else "build",
            "source": src.spec,
            "items_seen": len(src),
            "indexed": encoded.indexed,
            "skipped": len(encoded.skipped),
            "already_indexed": encoded.already_indexed,
            "shards": encoded.shards_total,
            "resumed_shards": encoded.shards_resumed,
            "encode_seconds": round(encoded.seconds, 3),
            "images_per_second": round(encoded.items_processed / encoded.seconds, 1) if encoded.seconds else None,
            "device": str(torch_device),
            "engine": engine,
            "batch_size": batch_size,
            "workers": workers,
        }
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
    _atomic_write(root / store.CURRENT_FILE, lambda f: f.write(f"{version_dir.name}\n".encode()))
    _fsync(root)
    for folder in _version_folders(root):
        if folder != version_dir:
            shutil.rmtree(folder, ignore_errors=True)  # open readers keep their memory maps (POSIX)


def _atomic_write(path: Path, write: Callable) -> None:
    """write(file) into a temporary file beside `path`, then rename it over `path`: readers see old or new.

    (Plain open(), unlike mkstemp, keeps the umask's permissions, so other users can read a shared index.)
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def _plan_id(src: ImageSource, model, model_sha: str, shard_size: int, max_pixels: int | None,
             base: dict | None, views: str) -> str:
    """Fingerprint of everything a shard's content depends on: shards of another plan are never reused."""
    keys = hashlib.sha256("\n".join(item.key for item in src.items).encode()).hexdigest()
    plan = {"format": store.FORMAT_VERSION, "weights": model_sha, "config": model.config.to_dict(),
            "source": src.spec, "keys": keys, "shard_size": shard_size, "max_pixels": max_pixels,
            "base": None if base is None else [base["version"], base["count"]]}
    if views != DEFAULT_VIEWS:  # absent for one view: plans (and resumable shards) of earlier builds stay valid
        plan["views"] = views
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


# -- decoding and encoding -----------------------------------------------------------------------------------------
def _to_model_input(config, image: Image.Image | None, array: np.ndarray | None) -> torch.Tensor:
    if array is not None:
        if array.shape == (config.in_chans, config.img_size, config.img_size):
            # the arrays the model was trained on (Fashion-MNIST): normalise only, as in training
            return normalize_uint8(config, torch.from_numpy(array.copy())[None])[0]
        image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    return preprocess_image(config, image)  # converts odd modes via to_mode


def _prepare(item: SourceItem, config, known: frozenset, max_pixels: int | None) -> _Prepared:
    """Runs in a worker thread: read, hash, skip if indexed, decode, preprocess. Never raises for bad input."""
    try:
        raw = read_item(item)
        if (item.key, raw.sha256) in known:
            return _Prepared(item, raw.sha256, already_indexed=True)
        loaded = decode_item(raw, max_pixels)
        pixels = _to_model_input(config, loaded.image, loaded.array)
        return _Prepared(item, raw.sha256, loaded.width, loaded.height, pixels)
    except UnreadableImage as e:
        return _Prepared(item, skip_reason=e.reason)
    except Exception as e:  # a file Pillow decodes but cannot convert, etc.: skip it, the build goes on
        return _Prepared(item, skip_reason=f"cannot decode or preprocess: {type(e).__name__}: {e}")


def _ordered_map(fn: Callable, items: Iterable, pool: ThreadPoolExecutor, lookahead: int) -> Iterator:
    """fn(item) in the pool's threads, yielded in input order, with at most `lookahead` items in flight."""
    items = iter(items)
    pending = collections.deque(pool.submit(fn, item) for item in itertools.islice(items, lookahead))
    while pending:
        result = pending.popleft().result()
        for item in itertools.islice(items, 1):
            pending.append(pool.submit(fn, item))
        yield result


@dataclass
class _Encoded:
    shard_files: list[Path]
    indexed: int = 0
    already_indexed: int = 0
    skipped: list[dict] = field(default_factory=list)
    shards_total: int = 0
    shards_resumed: int = 0
    items_processed: int = 0  # this run, resumed shards excluded
    seconds: float = 0.0


def _shard_path(shard_dir: Path, number: int) -> Path:
    return shard_dir / f"shard-{number:06d}.npz"


def _read_shard_meta(path: Path) -> dict | None:
    """A finished shard's metadata (its embeddings stay on disk), or None if there is no readable shard."""
    try:
        with np.load(path, allow_pickle=False) as data:  # an .npz reads only the members asked for
            return json.loads(str(data["meta"])) if "embeddings" in data.files else None
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


def _is_finished(meta: dict | None, plan: str, number: int, items: list[SourceItem]) -> bool:
    return (meta is not None and meta.get("plan") == plan and meta.get("shard") == number
            and meta.get("count") == len(items)
            and len(meta["indexed"]) + len(meta["skipped"]) + meta["already_indexed"] == len(items))


def _write_shard(path: Path, embeddings: np.ndarray, meta: dict) -> None:
    _atomic_write(path, lambda f: np.savez(f, embeddings=embeddings, meta=np.array(json.dumps(meta))))


def _encode_in_shards(src: ImageSource, model, device: torch.device, known: frozenset, shard_dir: Path, plan: str,
                      shard_size: int, batch_size: int, workers: int, max_pixels: int | None, progress: bool,
                      on_shard: Callable[[int, int], None] | None, views: str) -> _Encoded:
    shards = [list(src.items[start:start + shard_size]) for start in range(0, len(src.items), shard_size)]
    result = _Encoded([_shard_path(shard_dir, i) for i in range(len(shards))], shards_total=len(shards))
    todo = [number for number, items in enumerate(shards)
            if not _is_finished(_read_shard_meta(result.shard_files[number]), plan, number, items)]
    result.shards_resumed = len(shards) - len(todo)
    resumed_items = len(src.items) - sum(len(shards[number]) for number in todo)
    bar = tqdm(total=len(src.items), initial=resumed_items, unit="img", desc="indexing", disable=not progress,
               dynamic_ncols=True)  # shows images/s and the ETA
    skipped_so_far = 0
    config = model.config
    started = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    try:
        stream = _ordered_map(lambda item: _prepare(item, config, known, max_pixels),
                              (item for number in todo for item in shards[number]), pool,
                              lookahead=max(2 * batch_size, 4 * workers))
        for done, number in enumerate(todo, start=1):
            embeddings, meta = _encode_shard(model, device, shards[number], stream, batch_size, bar, views)
            meta.update(plan=plan, shard=number, count=len(shards[number]))
            _write_shard(result.shard_files[number], embeddings, meta)
            skipped_so_far += len(meta["skipped"])
            bar.set_postfix(skipped=skipped_so_far)
            result.items_processed += len(shards[number])
            if on_shard is not None:
                on_shard(result.shards_resumed + done, len(shards))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    result.seconds = time.perf_counter() - started

    for path in result.shard_files:  # totals over every shard, resumed ones included
        meta = _read_shard_meta(path)
        result.indexed += len(meta["indexed"])
        result.already_indexed += meta["already_indexed"]
        result.skipped.extend({"key": s["key"], "source": src.spec, "reason": s["reason"]} for s in meta["skipped"])
    return result


def _encode_shard(model, device: torch.device, items: list[SourceItem], stream: Iterator[_Prepared],
                  batch_size: int, bar, views: str) -> tuple[np.ndarray, dict]:
    """Encode one shard's items, pulled in order from the decode stream, in batches cut the same way each run."""
    indexed, skipped, already, chunks, batch = [], [], 0, [], []

    def flush():
        if batch:
            chunks.append(_embed(model, device, torch.stack([p.pixels for p in batch]), views))
            batch.clear()

    for _ in items:
        prepared = next(stream)
        if prepared.already_indexed:
            already += 1
        elif prepared.skip_reason is not None:
            log.info("skipping %s: %s", prepared.item.key, prepared.skip_reason)
            skipped.append({"key": prepared.item.key, "reason": prepared.skip_reason})
        else:
            item = prepared.item
            indexed.append({"key": item.key, "label": item.label, "label_name": item.label_name,
                            "sha256": prepared.sha256, "width": prepared.width, "height": prepared.height})
            batch.append(prepared)
            if len(batch) == batch_size:
                flush()
        bar.update(1)
    flush()
    d = model.config.d_model
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, d), dtype=np.float32)
    return embeddings, {"indexed": indexed, "skipped": skipped, "already_indexed": already}


def _embed(model, device: torch.device, pixels: torch.Tensor, views: str) -> np.ndarray:
    def one_view(x: torch.Tensor) -> np.ndarray:
        return F.normalize(model.embed(x, level=LEVEL).float(), dim=-1).cpu().numpy()

    with torch.inference_mode():
        pixels = pixels.to(device, non_blocking=True)
        return embed_views(one_view, pixels, views, black(model.config).to(pixels))


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
    source TEXT NOT NULL      -- the SOURCE the item came from: folder path, imagefolder:DIR or fashion-mnist:SPLIT
);
CREATE INDEX items_key ON items (key);
"""


def _assemble(version_dir: Path, src: ImageSource, model, model_sha: str, encoded: _Encoded, base: dict | None,
              base_dir: Path | None, index_type: str | None, memory_budget_mb: float, stats: dict,
              started: float, views: str) -> dict:
    """Write a complete version folder (not yet live)."""
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
    for path in encoded.shard_files:
        with np.load(path, allow_pickle=False) as data:
            embeddings, meta = data["embeddings"], json.loads(str(data["meta"]))
        if embeddings.shape != (len(meta["indexed"]), d):
            raise RuntimeError(f"shard {path} is damaged: delete {path.parent} and build again")
        vectors[row:row + len(embeddings)] = embeddings
        for item in meta["indexed"]:
            name = item["label_name"]
            rows.append((row, item["key"], label_of.get(name) if name is not None else None, name, item["sha256"],
                         item["width"], item["height"], src.spec))
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
        db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
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
    stats = dict(stats, seconds=round(time.perf_counter() - started, 3),
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
    _atomic_write(version_dir / store.MANIFEST_FILE, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    for path in version_dir.iterdir():
        _fsync(path)
    return manifest
