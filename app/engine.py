"""What the page needs besides Streamlit: the shared searcher, the default index build, uploads, thumbnails and
the accuracy-vs-cost records. Nothing here imports Streamlit, so it is testable and reusable on its own.

Search itself is `retrieval.search.Searcher`; this module only adapts its results for display.
"""
from __future__ import annotations

import contextlib
import io
import json
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .settings import EVAL_FILE_NAME, Settings

SMALL_IMAGE = 64  # images up to this size (e.g. 28x28 Fashion-MNIST) are enlarged for display
THUMB_SIZE = 128


class UploadRejected(ValueError):
    """A query file the page will not use; the message says which file and why, in words for the page."""


# -- the index: present, or built by the page -----------------------------------------------------------------------
def index_exists(index_dir: str | Path) -> bool:
    from index.store import current_version

    try:
        return current_version(index_dir) is not None
    except Exception:  # a damaged CURRENT file: "exists", so opening it reports the damage
        return True


def shard_size_for(limit: int | None, total: int = 60_000) -> int:
    """Shards small enough for the progress bar to move (about 20 steps), large enough to encode efficiently."""
    n = min(limit, total) if limit else total
    return int(min(2048, max(64, n // 20)))


class IndexBuilder:
    """Builds the default index once per process in a background thread, whichever session asked first.

    Sessions poll `state()` to draw a progress bar; a session going away does not stop the build.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.done = 0
        self.total = 0
        self.phase = "waiting"
        self.error: str | None = None
        self.started = 0.0
        self.finished = False

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and (self._thread.is_alive() or self.finished):
                return
            self.error, self.done, self.total, self.phase = None, 0, 0, "loading Fashion-MNIST"
            self.started = time.perf_counter()
            self._thread = threading.Thread(target=self._build, name="matsearch-index-build", daemon=True)
            self._thread.start()

    def _on_shard(self, done: int, total: int) -> None:
        self.done, self.total, self.phase = done, total, "encoding images with the full model"
        if done >= total:
            self.phase = "writing the FAISS index"

    def _build(self) -> None:
        from index import build_index

        s = self.settings
        try:
            build_index(s.build_source, s.index_dir, model_dir=s.model_dir, limit=s.default_limit,
                        device=s.device, progress=False, shard_size=shard_size_for(s.default_limit),
                        on_shard=self._on_shard)
            self.phase = "done"
        except Exception as e:  # shown in the page; the next session to load the page may try again
            self.error = f"{type(e).__name__}: {e}"
        finally:
            with self._lock:
                self.finished = self.error is None
                if self.error is not None:
                    self._thread = None

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started if self.started else 0.0


# -- the searcher ---------------------------------------------------------------------------------------------------
def open_searcher(settings: Settings):
    from retrieval.search import Searcher

    searcher = Searcher(settings.index_dir, model_dir=settings.model_dir, device=settings.device)
    if next(searcher.model.parameters()).device.type == "cpu":
        serve_queries_one_thread_each()
    return searcher


def serve_queries_one_thread_each() -> None:
    """Each session's script runs in its own thread; a query is a batch of one image. Intra-op threads do not
    make such a small encode faster, but every session thread that calls into torch gets its own team of them,
    so ten sessions at once would run twenty busy threads on two cores and each waits for the others' spinning.
    One intra-op thread per query lets the sessions themselves use the cores."""
    import torch

    torch.set_num_threads(1)


@dataclass
class Hit:
    id: int
    score: float
    label: str | None
    key: str
    blank: bool = False  # the item shows no content (one colour): its score says little


@dataclass
class Outcome:
    """One query's results, for display."""
    name: str  # the query: a file name or "database #id"
    image: Image.Image
    hits: list[Hit]
    timings: dict[str, float]  # ms: decode, encode, search, rerank
    mflops: float
    submodels: list[str] = field(default_factory=list)
    second_stage: str | None = None  # "reranked" (funnel) or "escalated" (adaptive): the large submodel was used

    @property
    def total_ms(self) -> float:
        return float(sum(self.timings.values()))


@dataclass
class Query:
    name: str
    image: Image.Image
    decode_ms: float = 0.0  # reading and decoding the file, before the searcher's own preprocessing
    exclude_id: int | None = None  # a database item as the query: leave the item itself out of its results


_GPU_FAISS_LOCKS: "weakref.WeakKeyDictionary[object, threading.Lock]" = weakref.WeakKeyDictionary()
_GPU_FAISS_LOCKS_LOCK = threading.Lock()


def _search_guard(searcher):
    """Sessions search concurrently: the model, FAISS CPU indexes and the store's metadata (behind its own lock)
    allow that. FAISS GPU indexes do not (their GPU resources are not thread-safe): those searches take turns."""
    if getattr(searcher.store, "backend", "") != "faiss-gpu":
        return contextlib.nullcontext()
    with _GPU_FAISS_LOCKS_LOCK:
        return _GPU_FAISS_LOCKS.setdefault(searcher, threading.Lock())


def search(searcher, queries: Sequence[Query], submodel, k: int, cascade=None,
           label_filter: Sequence[int | str] | None = None, score_threshold: float | None = None) -> list[Outcome]:
    """Run one search for the queries and turn the searcher's results into Outcomes (k hits at most each)."""
    if not queries:
        return []
    extra = 1 if any(q.exclude_id is not None for q in queries) else 0
    with _search_guard(searcher):
        results = searcher.search([q.image for q in queries], submodel=submodel, k=k + extra, cascade=cascade,
                                  label_filter=list(label_filter) if label_filter else None,
                                  score_threshold=score_threshold)
    outcomes = []
    for query, result in zip(queries, results):
        hits = [Hit(int(i), float(s), row.get("label_name") if row else None, row.get("key", "") if row else "",
                    bool(row.get("blank")) if row else False)
                for i, s, row in zip(result.ids, result.scores, result.metadata)
                if int(i) != query.exclude_id]
        timings = {stage: float(result.timings.get(stage, 0.0)) for stage in ("decode", "encode", "search", "rerank")}
        timings["decode"] += query.decode_ms
        stage = cascade.escalated_word if result.escalated else None
        outcomes.append(Outcome(query.name, query.image, hits[:k], timings, float(result.mflops),
                                list(result.submodels), stage))
    return outcomes


# -- uploads --------------------------------------------------------------------------------------------------------
def decode_upload(name: str, data: bytes, settings: Settings, target_size: int | None = None) -> Query:
    """An uploaded file -> a query image, in memory only; UploadRejected says what is wrong with it.

    target_size: `preprocess.decode_size` of the model, so the upload is decoded (at reduced size) as an index build
    decodes."""
    from vision_model.images import UnreadableImage, decode_image

    if len(data) > settings.max_upload_bytes:
        raise UploadRejected(f"{name}: the file is {_size(len(data))}, over the limit of "
                             f"{_size(settings.max_upload_bytes)}")
    start = time.perf_counter()
    try:
        image = decode_image(data, settings.max_pixels, target_size)
    except UnreadableImage as e:
        reason = e.reason
        if "too many pixels" in reason:
            reason = f"the image is too large (the limit is {settings.max_pixels:,} pixels)"
        elif reason.startswith("not a recognised image"):
            reason = "this is not an image the page can read (JPEG, PNG, WebP, BMP, GIF, TIFF or PPM)"
        elif reason.startswith("empty file"):
            reason = "the file is empty"
        raise UploadRejected(f"{name}: {reason}") from None
    except Exception as e:  # anything else Pillow might raise on hostile input: still a rejected upload
        raise UploadRejected(f"{name}: the image cannot be decoded ({type(e).__name__})") from None
    return Query(name, image, (time.perf_counter() - start) * 1e3)


def _size(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MB" if n >= 2 ** 20 else f"{n / 2 ** 10:.0f} KB"


# -- thumbnails -----------------------------------------------------------------------------------------------------
def thumbnail(image: Image.Image, size: int = THUMB_SIZE) -> Image.Image:
    """A display copy: small images (28x28) enlarged with nearest-neighbour so their pixels stay crisp, large
    ones shrunk with bicubic; always RGB or L, at most `size` pixels on the long side."""
    from vision_model.images import flatten

    img = flatten(image.copy())
    long_side = max(img.size)
    if long_side <= SMALL_IMAGE:
        factor = max(1, size // long_side)
        return img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    return img


def item_thumbnail_png(store, item_id: int, size: int = THUMB_SIZE) -> bytes:
    """A database item's thumbnail, read again from its source; a grey placeholder if the source is gone."""
    try:
        return png_bytes(thumbnail(store.load_image(item_id, target_size=size), size))
    except Exception:  # a moved or deleted file must not break the page; the result is still listed
        return png_bytes(Image.new("L", (size, size), 200))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# -- accuracy vs cost -----------------------------------------------------------------------------------------------
def eval_candidates(settings: Settings, model_dir: Path | None) -> list[Path]:
    if settings.eval_json is not None:
        return [settings.eval_json]
    found = [Path(model_dir) / EVAL_FILE_NAME] if model_dir is not None else []
    return found + [Path(settings.index_dir) / EVAL_FILE_NAME]


def load_eval_records(paths: Sequence[Path]) -> tuple[list[dict], Path | None, str | None]:
    """(records, the file they came from, a problem to show) from the first eval JSON that exists.

    Records are dicts with setting, top1, map@10, query_mflops, latency_ms (and kind); a file may hold a list
    of them or {"records": [...]}. Records lacking the numbers are left out.
    """
    for path in paths:
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return [], path, f"{path} could not be read as JSON: {e}"
        records = doc.get("records", doc.get("results", [])) if isinstance(doc, dict) else doc
        if not isinstance(records, list):
            return [], path, f"{path} holds no list of evaluation records"
        good = [r for r in records if isinstance(r, dict) and _is_number(r.get("query_mflops"))
                and _is_number(r.get("top1")) and isinstance(r.get("setting"), str)]
        if not good:
            return [], path, f"{path} holds no records with setting, top1 and query_mflops"
        return good, path, None
    return [], None, None


# `matsearch eval` measures on Fashion-MNIST only: train images as the database, test images as queries. Its
# records say so (database_source, query_source); older ones did not, and mean the same.
EVAL_DATABASE_SOURCE = "fashion-mnist:train"
EVAL_QUERY_SOURCE = "fashion-mnist:test"


@dataclass(frozen=True)
class EvalScope:
    """What evaluation records were measured on."""
    database_source: str
    query_source: str
    database: int | None = None  # database size, if recorded
    queries: int | None = None

    @classmethod
    def of(cls, records: Sequence[dict]) -> "EvalScope":
        first = records[0] if records else {}

        def count(key):
            value = first.get(key)
            return int(value) if _is_number(value) else None

        return cls(str(first.get("database_source") or EVAL_DATABASE_SOURCE),
                   str(first.get("query_source") or EVAL_QUERY_SOURCE), count("database"), count("queries"))

    def matches(self, store) -> bool:
        """Measured on this index: the same source (and only it), and as many images if the records say."""
        sources = store.manifest.get("sources") or [store.manifest.get("build", {}).get("source")]
        return list(sources) == [self.database_source] and self.database in (None, len(store))

    def describe(self) -> str:
        def part(source: str, n: int | None, role: str) -> str:
            size = f"{n:,} " if n is not None else ""
            return f"{size}{source_name(source)} images as {role}"

        return f"{part(self.database_source, self.database, 'the database')}, " \
               f"{part(self.query_source, self.queries, 'queries')}"


def source_name(spec: str) -> str:
    """A source string in words: fashion-mnist:train -> Fashion-MNIST train; a folder stays its path."""
    from index.sources import FASHION_MNIST_PREFIX

    if spec.startswith(FASHION_MNIST_PREFIX):
        return f"Fashion-MNIST {spec[len(FASHION_MNIST_PREFIX):]}"
    return f"`{spec}`"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def setting_name(submodel_name: str, cascade=None) -> str:
    """The name `matsearch eval` gives the current setting (records are matched by it)."""
    return cascade.name if cascade is not None else submodel_name
