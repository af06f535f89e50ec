"""Nearest-neighbour primitives shared by plain search, the funnel, adaptive mode and evaluation.

A *database* is anything with `search(queries, k) -> (scores, ids)`, `vectors` (n, d) float32 unit rows (FAISS id
== row) and `labels` (n,) int64 (-1: unlabelled): `index.IndexStore` is one, `InMemoryDatabase` another (for
evaluation on arrays, without an index folder). Result arrays are padded with id -1 and score -inf.
`labels_of(db, ids)` reads the labels of result ids (-1 for padding and unlabelled items).

FAISS is imported by `InMemoryDatabase` only: `labels_of` and the array helpers also serve machines without it (the
GPU benchmarks).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

_CHUNK_BYTES = 1 << 28  # bound on temporary score / gathered-vector arrays: 256 MiB


class VectorDatabase(Protocol):
    vectors: np.ndarray
    labels: np.ndarray  # (n,) int64, -1: unlabelled

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def __len__(self) -> int: ...


class InMemoryDatabase:
    """Exact inner-product search (faiss IndexFlatIP) over unit vectors held in memory."""

    def __init__(self, vectors: np.ndarray, labels: np.ndarray | None = None):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.labels = (np.full(len(vectors), -1, dtype=np.int64) if labels is None
                       else np.asarray(labels, dtype=np.int64))
        if self.vectors.ndim != 2 or len(self.labels) != len(self.vectors):
            raise ValueError("vectors must be (n, d) with one label per row")
        import faiss

        self._index = faiss.IndexFlatIP(self.vectors.shape[1])
        self._index.add(self.vectors)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).any())

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        scores[ids < 0] = -np.inf
        return scores, ids.astype(np.int64, copy=False)


def labels_of(db: VectorDatabase | np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The labels of a database's result ids (any shape), int64: -1 for padding ids (-1) and unlabelled items;
    IndexError for other ids outside the database. `db` may also be the database's label array itself."""
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.asarray(getattr(db, "labels", db))
    bad = (ids < -1) | (ids >= len(labels))
    if bad.any():
        raise IndexError(f"ids {np.unique(ids[bad])[:5].tolist()} are not in this database of {len(labels)} items")
    if len(labels) == 0:
        return np.full(ids.shape, -1, dtype=np.int64)
    return np.where(ids >= 0, labels[np.maximum(ids, 0)], -1).astype(np.int64, copy=False)


def has_labels(db: VectorDatabase) -> bool:
    """Whether any item of the database has a label."""
    known = getattr(db, "has_labels", None)
    return bool(known) if known is not None else bool((np.asarray(db.labels) >= 0).any())


def _empty(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k of each row of (scores, ids), best first; ids -1 / scores -inf pad rows shorter than k."""
    n, m = scores.shape
    out_scores, out_ids = _empty(n, k)
    take = min(k, m)
    if take == 0:
        return out_scores, out_ids
    part = np.argpartition(-scores, take - 1, axis=1)[:, :take] if take < m else np.tile(np.arange(m), (n, 1))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    out_scores[:, :take] = np.take_along_axis(scores, best, axis=1)
    out_ids[:, :take] = np.take_along_axis(ids, best, axis=1)
    out_ids[~np.isfinite(out_scores)] = -1
    return out_scores, out_ids


def search(db: VectorDatabase, queries: np.ndarray, k: int,
           allowed_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each query by inner product; with `allowed_ids`, exactly, among those rows only."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if allowed_ids is None:
        return db.search(queries, k)
    # a filter: exact dot products against the allowed rows (a FAISS index cannot restrict an IVF/PQ probe
    # without loss, and the allowed subset is what a filter makes small)
    allowed_ids = np.unique(np.asarray(allowed_ids, dtype=np.int64))  # sorted: memory-map reads in order
    best_scores, best_ids = _empty(len(queries), k)
    rows_per_chunk = max(1, _CHUNK_BYTES // (4 * max(1, len(queries)) + 4 * queries.shape[1]))
    for start in range(0, len(allowed_ids), rows_per_chunk):
        chunk = allowed_ids[start:start + rows_per_chunk]
        scores = queries @ np.asarray(db.vectors[chunk]).T
        chunk_ids = np.broadcast_to(chunk, scores.shape)
        best_scores, best_ids = _top_k(np.hstack([best_scores, scores]), np.hstack([best_ids, chunk_ids]), k)
    return best_scores, best_ids


def rerank(db: VectorDatabase, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-score each query's candidate ids (n, m) by exact dot products with the stored vectors; keep the best k."""
    queries = np.asarray(queries, dtype=np.float32)
    candidates = np.asarray(candidates, dtype=np.int64)
    n, m = candidates.shape
    scores = np.full((n, m), -np.inf, dtype=np.float32)
    rows_per_chunk = max(1, _CHUNK_BYTES // (4 * max(1, m) * queries.shape[1]))
    for start in range(0, n, rows_per_chunk):
        ids = candidates[start:start + rows_per_chunk]
        valid = ids >= 0
        gathered = np.asarray(db.vectors[np.where(valid, ids, 0).ravel()]).reshape(*ids.shape, -1)
        chunk_scores = np.einsum("nmd,nd->nm", gathered, queries[start:start + rows_per_chunk])
        scores[start:start + rows_per_chunk] = np.where(valid, chunk_scores, -np.inf)
    return _top_k(scores, candidates, k)


def top1_margin(scores: np.ndarray) -> np.ndarray:
    """Score gap between each query's best and second-best result: a small gap is an uncertain query.

    +inf where fewer than two results exist (nothing to confuse the best with).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape[1] < 2:
        return np.full(len(scores), np.inf)
    margin = scores[:, 0] - scores[:, 1]
    return np.where(np.isfinite(scores[:, 1]), margin, np.inf)
