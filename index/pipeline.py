"""The stages of an index build: reader -> mapper -> encoder -> writer. build.py runs them; other engines (e.g. a
Ray Data one) may call the same functions.

    reader   plan_chunks(n_items, start, shard_size, chunk_size) -> [(start, stop), ...] item ranges, shard-aligned
    mapper   prepare_item(item, config, known, max_pixels) -> Prepared: uint8 (c, s, s) model pixels at the model's
             resolution, sha256 of the content, stored width/height (or why it was skipped, or that it is indexed);
             with device_decode, an eligible JPEG's bytes instead of its pixels (jpeg_batch.py decodes them)
             prepare_chunk(items, config, known, max_pixels) -> Chunk: a range of items, pixels stacked
             decoded_chunks(items, ranges, ..., workers) -> Chunks in order, made by worker processes
    encoder  embed_batch(model, pixels_uint8, views) -> (b, d) float32 unit rows (bf16 on CUDA); BatchEncoder adds
             pinned staging buffers and asynchronous copies around it, and with a JpegBatchDecoder a thread that
             decodes each batch's JPEGs on the device before encoding it
    writer   write_piece(path, embeddings, meta) / read_piece_meta(path); PieceWriter: a thread that waits for
             each batch's vectors and writes pieces atomically, off the encoder's path

Work is saved in pieces: a piece holds the vectors of a range of items and ends where a batch ends, at the end of a
shard at the latest, or once `checkpoint_seconds` have passed since the previous piece. Batches restart at each
shard start and after each piece, so a build resumed from its pieces cuts its batches exactly as an uninterrupted
build does and stores the same bits.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vision_model.fileio import atomic_write
from vision_model.images import read_header
from vision_model.preprocess import decode_size, fitted_pixels, to_model_input
from vision_model.views import black, embed_views, views_of

from . import jpeg_batch
from .sources import SourceItem, UnreadableImage, decode_item, read_item

log = logging.getLogger(__name__)

LEVEL = 1  # indexes always hold full-granularity embeddings; queries may use any submodel
# Stage names, in pipeline order: seconds spent in each, summed over workers for the mapper's three; gpu_decode: the
# decode thread's seconds per batch (batched JPEG decoding and preprocessing on the device, --decode gpu)
STAGES = ("read", "decode", "preprocess", "wait", "gpu_decode", "encode", "write")
FILE_CHUNK = 16  # items per hand-over from a worker process: files cost milliseconds each
ARRAY_CHUNK = 512  # arrays (Fashion-MNIST) cost microseconds: bigger hand-overs amortise the inter-process copy


def default_workers(device: torch.device | str = "cpu") -> int:
    """Decoding processes: every core this process may use. On a CPU build the encoder runs in the main process
    on the same cores, and one process per core still measured best (docs/notes)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA (the encoder's fast path there); None (float32) elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else None


# -- reader --------------------------------------------------------------------------------------------------------
def plan_chunks(n_items: int, start: int, shard_size: int, chunk_size: int) -> list[tuple[int, int]]:
    """Item ranges [a, b) from `start` to `n_items`, at most chunk_size long, none crossing a shard boundary."""
    ranges, a = [], start
    while a < n_items:
        b = min(a + chunk_size, (a // shard_size + 1) * shard_size, n_items)
        ranges.append((a, b))
        a = b
    return ranges


def chunk_size_for(items: Sequence[SourceItem]) -> int:
    return ARRAY_CHUNK if items and items[0].array is not None else FILE_CHUNK


# -- mapper --------------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """What the mapper made of one item: pixels, or why it was skipped, or that the index has it already."""
    sha256: str | None = None
    width: int = 0
    height: int = 0
    pixels: torch.Tensor | None = None  # uint8 (c, s, s) at the model's resolution
    skip_reason: str | None = None
    already_indexed: bool = False
    blank: bool = False  # no content: one colour (vision_model.images.is_blank)
    jpeg: tuple | None = None  # (file bytes, EXIF orientation): a JPEG left to the device decoder, no pixels
    seconds: dict = field(default_factory=dict)  # read, decode, preprocess


def to_model_pixels(config, image: Image.Image | None, array: np.ndarray | None) -> torch.Tensor:
    """A decoded image or an item's array -> uint8 (c, s, s) model pixels (normalisation happens on the device)."""
    if array is not None:
        if array.shape == (config.in_chans, config.img_size, config.img_size):
            return torch.from_numpy(np.array(array))  # as the model trained on: used as they are (a writable copy)
        image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    return fitted_pixels(config, image)  # converts odd modes via to_mode


def prepare_item(item: SourceItem, config, known: frozenset = frozenset(), max_pixels: int | None = None,
                 device_decode: int | None = None) -> Prepared:
    """Read, hash, skip if (key, sha256) is in `known`, decode (JPEGs at reduced size where the model needs fewer
    pixels), resize to model pixels. Never raises for bad input: a bad item comes back with its skip_reason.

    device_decode: a pixel count; a JPEG the device decoder may take (jpeg_batch.eligible, at most that many
    pixels) comes back with its bytes (`jpeg`) instead of pixels, once its header has passed the CPU path's checks."""
    t0 = time.perf_counter()
    seconds = {}
    try:
        raw = read_item(item)
        t1 = time.perf_counter()
        seconds["read"] = t1 - t0
        if (item.key, raw.sha256) in known:
            return Prepared(raw.sha256, already_indexed=True, seconds=seconds)
        if device_decode and raw.data is not None:
            header = read_header(raw.data, max_pixels)  # refuses what decode_image would refuse before decoding
            if jpeg_batch.eligible(header, raw.data, device_decode):
                seconds["decode"] = time.perf_counter() - t1
                return Prepared(raw.sha256, header.width, header.height,
                                jpeg=(jpeg_batch.without_trailer(raw.data), header.orientation), seconds=seconds)
        loaded = decode_item(raw, max_pixels, target_size=decode_size(config))  # as a query is decoded
        t2 = time.perf_counter()
        seconds["decode"] = t2 - t1
        pixels = to_model_pixels(config, loaded.image, loaded.array)
        seconds["preprocess"] = time.perf_counter() - t2
        return Prepared(raw.sha256, loaded.width, loaded.height, pixels, blank=loaded.blank, seconds=seconds)
    except UnreadableImage as e:
        return Prepared(skip_reason=e.reason, seconds=seconds)
    except Exception as e:  # a file Pillow decodes but cannot convert, etc.: skip it, the build goes on
        return Prepared(skip_reason=f"cannot decode or preprocess: {type(e).__name__}: {e}", seconds=seconds)


@dataclass
class Chunk:
    """Consecutive items [start, stop) prepared: the good ones' pixels stacked, one record per item."""
    start: int
    stop: int
    pixels: torch.Tensor  # uint8 (n_good, c, s, s), the good items in order
    # per item: ("ok", sha256, width, height, blank) | ("skip", reason) | ("known",)
    #   | ("jpeg", sha256, width, height, orientation, offset, length): bytes encoded[offset:offset + length]
    records: list[tuple]
    seconds: dict[str, float]
    encoded: torch.Tensor | None = None  # uint8: the chunk's device-decoded JPEGs, one after the other


def prepare_chunk(items: Sequence[SourceItem], start: int, config, known: frozenset = frozenset(),
                  max_pixels: int | None = None, device_decode: int | None = None) -> Chunk:
    with warnings.catch_warnings():
        # Pillow only warns about images between its pixel limit and twice that: make it an error to skip
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        prepared = [prepare_item(item, config, known, max_pixels, device_decode) for item in items]
    good = [p.pixels for p in prepared if p.pixels is not None]
    c, s = config.in_chans, config.img_size
    pixels = torch.stack(good) if good else torch.empty((0, c, s, s), dtype=torch.uint8)
    records, blobs, offset = [], [], 0
    for p in prepared:
        if p.already_indexed:
            records.append(("known",))
        elif p.skip_reason is not None:
            records.append(("skip", p.skip_reason))
        elif p.jpeg is not None:
            records.append(("jpeg", p.sha256, p.width, p.height, p.jpeg[1], offset, len(p.jpeg[0])))
            blobs.append(p.jpeg[0])
            offset += len(p.jpeg[0])
        else:
            records.append(("ok", p.sha256, p.width, p.height, p.blank))
    # one tensor: it reaches the main process through shared memory, not through the pipe
    encoded = torch.from_numpy(np.frombuffer(b"".join(blobs), dtype=np.uint8).copy()) if blobs else None
    seconds = {stage: sum(p.seconds.get(stage, 0.0) for p in prepared) for stage in ("read", "decode", "preprocess")}
    return Chunk(start, start + len(items), pixels, records, seconds, encoded)


class _ChunkDataset(torch.utils.data.Dataset):
    def __init__(self, items, ranges, config, known, max_pixels, device_decode):
        self.items, self.ranges, self.config, self.known, self.max_pixels = items, ranges, config, known, max_pixels
        self.device_decode = device_decode

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, i: int) -> Chunk:
        a, b = self.ranges[i]
        return prepare_chunk(self.items[a:b], a, self.config, self.known, self.max_pixels, self.device_decode)


def _identity(x):
    return x


def decoded_chunks(items: Sequence[SourceItem], ranges: list[tuple[int, int]], config, known: frozenset,
                   max_pixels: int | None, workers: int, prefetch: int = 4,
                   device_decode: int | None = None) -> Iterator[Chunk]:
    """prepare_chunk over `ranges`, in order, in `workers` processes (0: in this one), each `prefetch` chunks ahead.

    Worker processes are forked where the platform can (the item list is shared, not pickled); a chunk's pixels
    come back through shared memory."""
    dataset = _ChunkDataset(items, ranges, config, known, max_pixels, device_decode)
    if workers == 0:
        return (dataset[i] for i in range(len(dataset)))
    import multiprocessing
    context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                         collate_fn=_identity, prefetch_factor=prefetch,
                                         multiprocessing_context=context)
    return iter(loader)


# -- encoder -------------------------------------------------------------------------------------------------------
def embed_batch(model, pixels: torch.Tensor, views: str = "1") -> torch.Tensor:
    """uint8 model pixels (b, c, s, s) on the model's device -> (b, d) float32 L2-normalised full-model embeddings
    (each the normalised mean of its views' embeddings), on that device. bf16 autocast on CUDA."""
    dtype = autocast_dtype(pixels.device)

    def one_view(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(pixels.device.type, dtype=dtype, enabled=dtype is not None):
            e = model.embed(x, level=LEVEL)
        return F.normalize(e.float(), dim=-1)

    with torch.inference_mode():
        x = to_model_input(model.config, pixels)
        if views_of(views) == views_of("1"):
            return one_view(x)
        total = embed_views(lambda v: one_view(v).cpu().numpy(), x, views, black(model.config).to(x))
        return torch.from_numpy(total)


@dataclass
class EncodedBatch:
    """A batch on its way: `vectors` (CPU) are ready once `ready` (a CUDA event, or None on the CPU) has fired.

    With a decode thread (--decode gpu) the batch is first `pending`, a future of the launched EncodedBatch, which
    also carries what decoding found: each JPEG job's blank flag (`blank`, ready with the vectors), the jobs the CPU
    decoder had to take (`fallback`), the ones neither decoder could decode (`failed`: job index -> reason; their
    rows are to be dropped) and the decode thread's seconds."""
    vectors: torch.Tensor | None = None
    ready: object = None
    timing: tuple | None = None  # CUDA (start, end) events around the encoder; None: `seconds` is exact
    seconds: float = 0.0
    pending: Future | None = None
    jobs: list = field(default_factory=list)  # jpeg_batch.JpegJob of the batch
    blank: torch.Tensor | None = None  # bool (len(jobs),), host
    fallback: int = 0
    failed: dict = field(default_factory=dict)
    decode_seconds: float = 0.0
    copied: object = None  # CUDA event: the staging buffer has reached the device

    def resolved(self) -> "EncodedBatch":
        """The launched batch (waits for the decode thread to get to it; raises what it raised)."""
        return self.pending.result() if self.pending is not None else self

    def wait(self) -> tuple[np.ndarray, float]:
        """(vectors (b, d) float32, encoder seconds), once ready."""
        batch = self.resolved()
        if batch.ready is not None:
            batch.ready.synchronize()
        seconds = batch.timing[0].elapsed_time(batch.timing[1]) / 1e3 if batch.timing else batch.seconds
        return batch.vectors.numpy(), seconds


def _on_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A small int64 tensor on `device` without a host synchronisation (pinned, non-blocking on CUDA)."""
    t = torch.tensor(values, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class BatchEncoder:
    """embed_batch with staging: the mapper's pixels are copied into one of `ring` pinned buffers, sent to the GPU
    without blocking, and encoded while the main thread fills the next buffer; the vectors come back the same way.

    With a `decoder` (jpeg_batch.JpegBatchDecoder), encode() also takes the batch's JPEG jobs (slots left empty in
    the buffer) and hands the batch to one decode thread, which decodes the JPEGs on the device (on its own CUDA
    stream), fills their slots and launches the encoder: the next batch's decoding (blocking that thread, on the
    JPEG engines) overlaps this batch's encoding (on the SMs), and the main thread keeps collecting."""

    def __init__(self, model, device: torch.device, batch_size: int, views: str = "1", ring: int = 3,
                 decoder=None):
        self.model, self.device, self.views, self.batch_size = model, device, views, batch_size
        self.cuda = device.type == "cuda"
        self.decoder = decoder
        c, s = model.config.in_chans, model.config.img_size
        self._buffers = [torch.empty((batch_size, c, s, s), dtype=torch.uint8, pin_memory=self.cuda)
                         for _ in range(ring if self.cuda or decoder is not None else 1)]
        self._copied = [None] * len(self._buffers)  # per buffer: event (or future) of its last host-to-device copy
        self._next = 0
        self._thread = None
        self._stream = None
        if decoder is not None:
            from concurrent.futures import ThreadPoolExecutor
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="index-decode")
            self._stream = torch.cuda.Stream(device) if self.cuda else None

    def buffer(self) -> torch.Tensor:
        """The next staging buffer (batch_size, c, s, s) uint8, free to be filled."""
        i = self._next
        copied = self._copied[i]
        if isinstance(copied, Future):
            copied = copied.result().copied  # the decode thread is done with it (or has sent it to the device)
        if copied is not None:
            copied.synchronize()  # its previous contents have reached the GPU
        self._copied[i] = None
        return self._buffers[i]

    def encode(self, count: int, jobs: Sequence = ()) -> EncodedBatch:
        """Encode the first `count` images of the buffer buffer() returned last, asynchronously on CUDA; `jobs`:
        the JPEGs (jpeg_batch.JpegJob) whose slots the device decoder fills (needs a decoder)."""
        i = self._next
        self._next = (i + 1) % len(self._buffers)
        host = self._buffers[i][:count]
        if self._thread is not None:
            future = self._thread.submit(self._decode_and_encode, host, list(jobs))
            self._copied[i] = future
            return EncodedBatch(pending=future)
        if jobs:
            raise ValueError("JPEG jobs need a BatchEncoder with a decoder")
        if not self.cuda:
            return self._launch(host)
        pixels = host.to(self.device, non_blocking=True)
        self._copied[i] = torch.cuda.Event()
        self._copied[i].record()
        return self._launch(pixels)

    def _launch(self, pixels: torch.Tensor) -> EncodedBatch:
        if not self.cuda:
            start = time.perf_counter()
            vectors = embed_batch(self.model, pixels, self.views)
            return EncodedBatch(vectors, seconds=time.perf_counter() - start)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        vectors = embed_batch(self.model, pixels, self.views)
        end.record()
        out = torch.empty(vectors.shape, dtype=torch.float32, pin_memory=True)
        out.copy_(vectors, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return EncodedBatch(out, ready, (start, end))

    def _decode_and_encode(self, host: torch.Tensor, jobs: list) -> EncodedBatch:
        """In the decode thread: decode the jobs, fill their slots, launch the encoder."""
        started = time.perf_counter()
        decoded = None
        if jobs:
            if self.cuda:
                # the decoder's own stream: its per-call synchronisations wait for its kernels, not the encoder's
                with torch.cuda.stream(self._stream):
                    decoded = self.decoder.decode(jobs)
                decoded.pixels.record_stream(torch.cuda.current_stream(self.device))
                decoded.blank.record_stream(torch.cuda.current_stream(self.device))
                torch.cuda.current_stream(self.device).wait_stream(self._stream)
            else:
                decoded = self.decoder.decode(jobs)
        if self.cuda:
            pixels = host.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        else:
            pixels, copied = host, None  # filled in place: the main thread waits for this job before reusing it
        blank = None
        if decoded is not None:
            pixels.index_copy_(0, _on_device([job.slot for job in jobs], self.device), decoded.pixels)
            blank = decoded.blank
            if self.cuda:
                blank = torch.empty(len(jobs), dtype=torch.bool, pin_memory=True)
                blank.copy_(decoded.blank, non_blocking=True)
        decode_seconds = time.perf_counter() - started
        batch = self._launch(pixels)
        batch.copied, batch.jobs, batch.blank, batch.decode_seconds = copied, jobs, blank, decode_seconds
        if decoded is not None:
            batch.fallback, batch.failed = decoded.fallback, decoded.failed
        return batch

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)


# -- writer --------------------------------------------------------------------------------------------------------
def piece_path(folder: Path, start: int, stop: int) -> Path:
    return folder / f"piece-{start:09d}-{stop:09d}.npz"


def write_piece(path: Path, embeddings: np.ndarray, meta: dict) -> None:
    """Write a piece (its vectors and metadata) atomically: readers see the whole file or none."""
    atomic_write(path, lambda f: np.savez(f, embeddings=embeddings, meta=np.array(json.dumps(meta))))


def read_piece_meta(path: Path) -> dict | None:
    """A piece's metadata (its vectors stay on disk), or None if the file is not a readable piece."""
    try:
        with np.load(path, allow_pickle=False) as data:  # an .npz reads only the members asked for
            return json.loads(str(data["meta"])) if "embeddings" in data.files else None
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


def read_piece(path: Path) -> tuple[np.ndarray, dict]:
    with np.load(path, allow_pickle=False) as data:
        return data["embeddings"], json.loads(str(data["meta"]))


class PieceWriter:
    """A thread that collects each batch's vectors as they come back and writes each finished piece.

    put_batch(EncodedBatch) and put_piece(path, meta) are called in order by the main thread; after a piece is
    written, on_written(meta) runs in this thread. An error here is raised in the main thread by the next put or
    by close()."""

    def __init__(self, dim: int, on_written: Callable[[dict], None] | None = None, depth: int = 8):
        self.dim, self.on_written = dim, on_written
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._carry_write = 0.0  # seconds writing the previous piece: stored with the next one
        self.write_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def put_batch(self, batch: EncodedBatch) -> None:
        self._check()
        self._queue.put(("batch", batch))

    def put_piece(self, path: Path, meta: dict) -> None:
        self._check()
        self._queue.put(("piece", (path, meta)))

    def __enter__(self) -> "PieceWriter":
        return self

    def __exit__(self, kind, *_) -> bool:
        """Closing waits for every write; an exception in the block aborts the writes still queued."""
        if kind is None:
            self.close()
        else:
            self.abort()
        return False

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._check()

    def abort(self) -> None:
        """Stop after what is queued, without raising: for a main thread that is already failing."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        vectors, encode_seconds = [], 0.0
        decoded = {"device": 0, "fallback": 0, "seconds": 0.0, "failed": []}  # this piece's, from the decode thread
        while True:
            message = self._queue.get()
            if message is None:
                return
            if self._error is not None:
                continue  # drain, so the main thread never blocks on a full queue
            try:
                kind, payload = message
                if kind == "batch":
                    rows, seconds = payload.wait()
                    vectors.append(self._decoded(payload.resolved(), rows, decoded))
                    encode_seconds += seconds
                    continue
                path, meta = payload
                start = time.perf_counter()
                if decoded["failed"]:  # items neither decoder could decode: skipped, as the CPU path skips them
                    dropped = {id(entry) for entry, _ in decoded["failed"]}
                    meta["indexed"] = [entry for entry in meta["indexed"] if id(entry) not in dropped]
                    meta["skipped"] = meta["skipped"] + [{"key": entry["key"], "reason": reason}
                                                         for entry, reason in decoded["failed"]]
                    meta["skipped"].sort(key=lambda s: s["key"])
                embeddings = np.concatenate(vectors) if vectors else np.zeros((0, self.dim), np.float32)
                if len(embeddings) != len(meta["indexed"]):
                    raise RuntimeError(f"piece {path.name}: {len(embeddings)} vectors for {len(meta['indexed'])} "
                                       "items")
                meta["seconds"] = dict(meta["seconds"], encode=encode_seconds, write=self._carry_write,
                                       gpu_decode=decoded["seconds"])
                if decoded["device"] or decoded["fallback"]:
                    meta["decoded"] = {"device": decoded["device"], "fallback": decoded["fallback"]}
                write_piece(path, embeddings, meta)
                self._carry_write = time.perf_counter() - start
                self.write_seconds += self._carry_write
                vectors, encode_seconds = [], 0.0
                decoded = {"device": 0, "fallback": 0, "seconds": 0.0, "failed": []}
                if self.on_written is not None:
                    self.on_written(meta)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self._error = e

    @staticmethod
    def _decoded(batch: EncodedBatch, rows: np.ndarray, decoded: dict) -> np.ndarray:
        """Apply what the decode thread found to the batch's metadata rows; its vectors without failed items'."""
        decoded["seconds"] += batch.decode_seconds
        if not batch.jobs:
            return rows
        flags = batch.blank.tolist()
        for job, flag in zip(batch.jobs, flags):
            job.entry["blank"] = bool(flag)
        decoded["fallback"] += batch.fallback
        decoded["device"] += len(batch.jobs) - batch.fallback - len(batch.failed)
        if not batch.failed:
            return rows
        decoded["failed"].extend((batch.jobs[i].entry, reason) for i, reason in batch.failed.items())
        return np.delete(rows, [batch.jobs[i].slot for i in batch.failed], axis=0)
