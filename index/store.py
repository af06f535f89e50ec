"""Reading an index folder: `IndexStore.open(DIR)`.

On-disk layout (DIR is what `matsearch index build --out DIR` names):

    DIR/CURRENT                  the name of the live version folder, e.g. "v000003" (replaced atomically)
    DIR/v000003/manifest.json    model, embedding and index description, build stats, skipped files
    DIR/v000003/index.faiss      faiss.write_index; FAISS id i == row i of embeddings.npy == metadata id i
    DIR/v000003/index.ivfdata    on-disk indexes only: their inverted lists, memory-mapped (ondisk.py)
    DIR/v000003/embeddings.npy   float32 (n, d), L2-normalised full-model (level 1) embeddings
    DIR/v000003/metadata.sqlite  table items(id, key, label, label_name, sha256, width, height, source, blank)
    DIR/shards/<plan>/...        per-shard work of an unfinished build (resumable); removed once it is published
    DIR/.lock                    held by a running build

A version folder is written completely before CURRENT names it and never changes afterwards, so a reader
always sees a whole index: the previous one until the new one is published, whatever happens in between.
"""
from __future__ import annotations

import functools
import json
import re
import sqlite3
import threading
from pathlib import Path
from typing import Iterable

import faiss
import numpy as np

from . import ondisk, sources
from .index_types import apply_search_params

CURRENT_FILE = "CURRENT"
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
EMBEDDINGS_FILE = "embeddings.npy"
# candidates a compressed index's search re-scores exactly: the depth benchmarks/ann_scale.py needed at 10^7 vectors
RERANK_DEPTH = 200
METADATA_FILE = "metadata.sqlite"
FORMAT = "matsearch-index"
FORMAT_VERSION = 1
VERSION_NAME = re.compile(r"^v(\d{6})$")
METADATA_COLUMNS = ("id", "key", "label", "label_name", "sha256", "width", "height", "source", "blank")
# columns added after format version 1 was published: (name, SQL type); older tables read them as NULL
ADDED_COLUMNS = (("blank", "INTEGER"),)
_SQL_CHUNK = 500  # ids per "IN (...)" query, well under SQLite's variable limit


def add_missing_columns(db: sqlite3.Connection) -> None:
    """Give an items table written before ADDED_COLUMNS existed those columns (NULL: not recorded)."""
    present = {row[1] for row in db.execute("PRAGMA table_info(items)")}
    for name, sql_type in ADDED_COLUMNS:
        if name not in present:
            db.execute(f"ALTER TABLE items ADD COLUMN {name} {sql_type}")


def count_blank(version_dir: str | Path) -> int | None:
    """How many items of a version show no content (one colour); None if its build did not record that."""
    db = sqlite3.connect(f"{(Path(version_dir) / METADATA_FILE).resolve().as_uri()}?mode=ro", uri=True)
    try:
        if "blank" not in {row[1] for row in db.execute("PRAGMA table_info(items)")}:
            return None
        recorded, blank = db.execute("SELECT COUNT(blank), COALESCE(SUM(blank), 0) FROM items").fetchone()
        return int(blank) if recorded else None
    finally:
        db.close()


class CorruptIndexError(RuntimeError):
    """An index folder exists but cannot be used as it is."""


def version_name(number: int) -> str:
    return f"v{number:06d}"


def current_version(root: str | Path) -> Path | None:
    """The live version folder of index folder `root`, or None if nothing was ever published there."""
    pointer = Path(root) / CURRENT_FILE
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    if not VERSION_NAME.match(name):
        raise CorruptIndexError(f"{pointer} should name a version folder like v000001, holds {name[:40]!r}")
    return Path(root) / name


def resolve_version_dir(directory: str | Path) -> Path:
    """An index folder (with CURRENT) or one of its version folders -> the version folder to read."""
    directory = Path(directory)
    if (directory / MANIFEST_FILE).is_file():
        return directory
    if not directory.is_dir():
        raise FileNotFoundError(f"no index at {directory}: the folder does not exist "
                                "(build one with `matsearch index build SOURCE --out DIR`)")
    version = current_version(directory)
    if version is None:
        partial = " (an unfinished build's shards are there: rerun it to finish)" if (directory / "shards").is_dir() \
            else ""
        raise FileNotFoundError(f"no index in {directory}: it has no {CURRENT_FILE} file{partial}")
    if not version.is_dir():
        raise CorruptIndexError(f"{directory}/{CURRENT_FILE} names {version.name}, which does not exist")
    return version


def read_manifest(version_dir: str | Path) -> dict:
    path = Path(version_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptIndexError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptIndexError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptIndexError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorruptIndexError(f"{path} has format version {manifest.get('format_version')}; this code reads "
                                f"version {FORMAT_VERSION}: rebuild the index")
    return manifest


def _read_pointer(directory: Path) -> str | None:
    try:
        return (directory / CURRENT_FILE).read_text()
    except OSError:
        return None


class IndexStore:
    """A published index: FAISS search over the stored embeddings, plus their metadata.

    Search is FAISS on the CPU; on a CUDA device FAISS's GPU index where faiss has GPU support (and the index
    type has a GPU version), otherwise exact inner-product search with torch against the stored vectors.
    """

    def __init__(self, version_dir: Path, manifest: dict, vectors: np.ndarray, index: faiss.Index | None,
                 db: sqlite3.Connection, backend: str, device: str):
        self.directory = version_dir
        self.manifest = manifest
        self.vectors = vectors  # (n, d) float32, L2-normalised, memory-mapped
        self.device = device
        self.backend = backend  # "faiss-cpu", "faiss-gpu" or "torch"
        self._index = index
        self._db = db
        self._db_lock = threading.Lock()  # one connection shared by threads (e.g. a web app's)
        self._gpu_resources = None
        self._torch_vectors = None
        with self._db_lock:
            present = {row[1] for row in db.execute("PRAGMA table_info(items)")}
        # columns this version lacks (an index built before they were added) read as NULL
        self._select = ", ".join(c if c in present else f"NULL AS {c}" for c in METADATA_COLUMNS)

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """Label id per item (-1: none), read on first use: a plain query needs none (a million rows take 0.5 s)."""
        with self._db_lock:
            rows = self._db.execute("SELECT COALESCE(label, -1) FROM items ORDER BY id").fetchall()
        labels = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
        labels.setflags(write=False)  # a published version never changes
        return labels

    @functools.cached_property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).any())

    # -- opening ---------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path, device: str = "auto", nprobe: int | None = None,
             ef_search: int | None = None, backend: str = "auto") -> "IndexStore":
        """Open the index in `directory` (an index folder, or one of its version folders).

        device: "auto" (CUDA if available), "cpu", "cuda" or "cuda:N".
        nprobe / ef_search: override the manifest's search parameters for IVF / HNSW indexes.
        backend: "auto" (FAISS, on the GPU where faiss can; torch on CUDA where it cannot), "faiss", or "torch"
            (exact inner products against the stored vectors on `device`, e.g. as ground truth).
        """
        if backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
        from vision_model.device import resolve_device  # imports torch: only when an index is opened

        device = str(resolve_device(device))
        directory = Path(directory)
        for attempt in range(3):
            pointer = _read_pointer(directory)
            try:
                return cls._open_version(resolve_version_dir(directory), device, nprobe, ef_search,
                                         backend)
            except CorruptIndexError:
                # a build may have published a new version and retired the one we were opening: try the new one
                if attempt == 2 or _read_pointer(directory) == pointer:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _open_version(cls, version_dir: Path, device: str, nprobe: int | None, ef_search: int | None,
                      backend: str):
        manifest = read_manifest(version_dir)
        files = {name: version_dir / name for name in (INDEX_FILE, EMBEDDINGS_FILE, METADATA_FILE)}
        missing = [name for name, path in files.items() if not path.is_file()]
        if missing:
            raise CorruptIndexError(f"index version {version_dir} is missing {', '.join(missing)}")
        try:
            vectors = np.load(files[EMBEDDINGS_FILE], mmap_mode="r")
        except (ValueError, OSError) as e:
            raise CorruptIndexError(f"{files[EMBEDDINGS_FILE]} is not a readable .npy file: {e}") from None
        count, dim = manifest["count"], manifest["embedding_dim"]
        if vectors.dtype != np.float32 or vectors.shape != (count, dim):
            raise CorruptIndexError(f"{files[EMBEDDINGS_FILE]} holds {vectors.dtype} {vectors.shape}; the manifest "
                                    f"says float32 ({count}, {dim})")
        try:
            # immutable: a published version never changes, so SQLite may skip all locking
            db = sqlite3.connect(f"{files[METADATA_FILE].resolve().as_uri()}?mode=ro&immutable=1", uri=True,
                                 check_same_thread=False)
            rows = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise CorruptIndexError(f"{files[METADATA_FILE]} is not a readable metadata table: {e}") from None
        if rows != count:
            db.close()
            raise CorruptIndexError(f"{files[METADATA_FILE]} has {rows} rows; the manifest says {count}")

        params = dict(manifest.get("search_params", {}))
        params.update({k: v for k, v in (("nprobe", nprobe), ("efSearch", ef_search)) if v is not None})
        on_cuda = device.startswith("cuda")
        use_torch = backend == "torch" or (backend == "auto" and on_cuda and faiss.get_num_gpus() == 0)
        index = None
        if not use_torch:
            index = cls._read_faiss(files[INDEX_FILE], count, dim)
            apply_search_params(index, params)
        store = cls(version_dir, manifest, vectors, index, db, "torch" if use_torch else "faiss-cpu", device)
        if on_cuda and not use_torch and faiss.get_num_gpus() > 0:
            store._to_faiss_gpu(params, fall_back_to_torch=backend == "auto")
        if store.backend == "torch":
            store._load_torch_vectors()
        return store

    @staticmethod
    def _read_faiss(path: Path, count: int, dim: int) -> faiss.Index:
        try:
            index = ondisk.read_index(path)  # inverted lists in an .ivfdata file beside it are memory-mapped
        except RuntimeError as e:
            raise CorruptIndexError(f"{path} is not a readable FAISS index: {str(e).strip()[:200]}") from None
        if index.ntotal != count or index.d != dim:
            raise CorruptIndexError(f"{path} holds {index.ntotal} vectors of dim {index.d}; the manifest says "
                                    f"{count} of dim {dim}")
        return index

    def _to_faiss_gpu(self, params: dict, fall_back_to_torch: bool) -> None:
        device_number = int(self.device.partition(":")[2] or 0)
        try:
            resources = faiss.StandardGpuResources()
            gpu_index = faiss.index_cpu_to_gpu(resources, device_number, self._index)
            apply_search_params(gpu_index, params, gpu=True)
        except (RuntimeError, AttributeError):  # e.g. HNSW has no GPU version
            if fall_back_to_torch:  # exact search on the GPU beats approximate search on the CPU
                self._index = None
                self.backend = "torch"
            return
        self._gpu_resources, self._index, self.backend = resources, gpu_index, "faiss-gpu"

    def _load_torch_vectors(self, chunk: int = 65_536) -> None:
        import torch
        vectors = torch.empty(self.vectors.shape, dtype=torch.float32, device=self.device)
        for start in range(0, len(vectors), chunk):  # from the memory map a chunk at a time: no full host copy
            vectors[start:start + chunk] = torch.from_numpy(np.array(self.vectors[start:start + chunk]))
        self._torch_vectors = vectors

    def close(self) -> None:
        with self._db_lock:
            self._db.close()
        self._index = self._torch_vectors = self._gpu_resources = None

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- facts -----------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def label_names(self) -> list[str]:
        return list(self.manifest.get("label_names", []))

    @property
    def views(self) -> str:
        """The view set each stored vector averages (vision_model.views); indexes from before views: one view."""
        return self.manifest.get("views", "1")

    @property
    def weights_sha256(self) -> str:
        """sha256 of the weights the index was built with: compare with vision_model.weights_hash(model_dir)."""
        return self.manifest["weights_sha256"]

    @property
    def model_dir(self) -> Path:
        return Path(self.manifest["model_dir"])

    # -- search ----------------------------------------------------------------------------------------------------
    @functools.cached_property
    def compressed(self) -> bool:
        """Whether FAISS scores compressed codes (PQ, scalar quantizer) rather than the vectors themselves."""
        if self._index is None:
            return False
        index = self._index
        try:
            index = faiss.extract_index_ivf(index)
        except RuntimeError:  # not an IVF index
            pass
        name = type(faiss.downcast_index(index)).__name__
        return "PQ" in name or "ScalarQuantizer" in name or "SQ" in name

    def search(self, queries: np.ndarray, k: int, rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product for queries (n, d) float32 (L2-normalise them for cosine scores).

        rerank: for a compressed index (IVF-PQ in RAM or on disk), the FAISS candidates re-scored exactly against
        the stored vectors (memory-mapped: only their rows are read); None: max(k, RERANK_DEPTH), 0: none. Codes
        of d/8 bytes lose the order among near neighbours, the exact re-scoring restores it (docs/notes.md 18.8).
        Returns (scores float32 (n, k), ids int64 (n, k)), best first; where fewer than k exist, ids are -1 and
        scores -inf.
        """
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}) float32, got shape {np.shape(queries)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.backend == "torch":
            return self._search_torch(q, k)
        depth = RERANK_DEPTH if rerank is None else rerank
        depth = max(k, depth) if depth and self.compressed else 0
        scores, ids = self._index.search(q, depth or k)
        ids = ids.astype(np.int64, copy=False)
        if depth:
            from .ondisk import rerank as rescore
            scores, ids = rescore(self.vectors, q, ids, k)
        scores[ids < 0] = -np.inf
        return scores, ids

    def _search_torch(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch
        n = len(self)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        kept = min(k, n)
        if kept == 0:
            return scores, ids
        rows_per_chunk = max(1, (1 << 28) // max(n, 1))  # bound the (queries x n) score matrix to 1 GiB
        with torch.inference_mode():
            for start in range(0, len(q), rows_per_chunk):
                chunk = torch.tensor(q[start:start + rows_per_chunk], device=self.device)  # copies: q may be read-only
                top = torch.topk(chunk @ self._torch_vectors.T, kept, dim=1)
                scores[start:start + len(chunk), :kept] = top.values.cpu().numpy()
                ids[start:start + len(chunk), :kept] = top.indices.cpu().numpy()
        return scores, ids

    # -- metadata --------------------------------------------------------------------------------------------------
    def metadata(self, ids: Iterable[int] | np.ndarray) -> list[dict | None]:
        """One dict per id, in the order given (columns of METADATA_COLUMNS); None for -1 (no result)."""
        wanted = [int(i) for i in np.asarray(ids, dtype=np.int64).ravel()]
        found: dict[int, dict] = {}
        distinct = sorted({i for i in wanted if i >= 0})
        with self._db_lock:
            for start in range(0, len(distinct), _SQL_CHUNK):
                chunk = distinct[start:start + _SQL_CHUNK]
                rows = self._db.execute(
                    f"SELECT {self._select} FROM items WHERE id IN ({', '.join('?' * len(chunk))})",
                    chunk).fetchall()
                found.update((row[0], _row_dict(row)) for row in rows)
        missing = [i for i in distinct if i not in found]
        if missing:
            raise IndexError(f"ids {missing[:5]} are not in this index of {len(self)} items")
        return [found[i] if i >= 0 else None for i in wanted]

    def load_image(self, id: int, target_size: int | None = None):
        """The PIL image item `id` was built from (read again from its source), e.g. to show a result; decoded
        at reduced size for `target_size` (vision_model.images.decode_image). The pixel limit admits the size
        the item had when it was indexed (a build may have raised it), and no more."""
        from vision_model.images import DEFAULT_MAX_PIXELS

        row = self.metadata([id])[0]
        if row is None:
            raise IndexError("id -1 names no item")
        indexed = (row["width"] or 0) * (row["height"] or 0)
        return sources.load_image(row["source"], row["key"], target_size, max(DEFAULT_MAX_PIXELS, indexed))

    def __repr__(self) -> str:
        return (f"IndexStore({str(self.directory)!r}, n={len(self)}, dim={self.dim}, "
                f"index={self.manifest.get('index_factory')!r}, backend={self.backend!r})")


def _row_dict(row: tuple) -> dict:
    out = dict(zip(METADATA_COLUMNS, row))
    out["blank"] = None if out["blank"] is None else bool(out["blank"])
    return out
