"""Retrieval metrics on ranked result ids, and a latency probe.

Relevance is label equality: a retrieved item is relevant to a query if it carries the query's label. Result
labels are what `retrieval.knn.labels_of` reads: -1 for padding and unlabelled items, which are relevant to no query.

- top-1 accuracy: fraction of queries whose nearest neighbour has the query's label (1-NN classification).
- AP@k (precision-based average precision over the top k):
      AP@k = 1/min(k, R) * sum_{i=1..k} P@i * rel_i
  where rel_i is 1 if the i-th result is relevant, P@i the fraction of relevant results among the first i and R
  the number of relevant items in the whole database (if unknown: the number of relevant results in the top k,
  with AP@k = 0 when there are none). mAP@k is the mean of AP@k over queries. A perfect ranking scores 1.
- recall@k of the full-model neighbours: |top-k of a setting ∩ top-k of the full-model query| / k, i.e. how much
  of the full model's answer a cheaper setting reproduces (1 for the full model itself).
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

import numpy as np

def relevance(result_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """(n, k) bool: each result carries its query's label (padding and unlabelled results never do)."""
    result_labels = np.asarray(result_labels)
    return (result_labels == np.asarray(query_labels)[:, None]) & (result_labels >= 0)


def top1_accuracy(result_labels: np.ndarray, query_labels: np.ndarray) -> float:
    return float(np.mean(relevance(np.asarray(result_labels)[:, :1], query_labels)))


def average_precision_at_k(result_labels: np.ndarray, query_labels: np.ndarray, k: int,
                           n_relevant: np.ndarray | None = None) -> np.ndarray:
    """AP@k of each query (see the module docstring); n_relevant: relevant items in the database per query."""
    relevant = relevance(np.asarray(result_labels)[:, :k], query_labels).astype(np.float64)
    ranks = np.arange(1, relevant.shape[1] + 1)
    precision_at_i = np.cumsum(relevant, axis=1) / ranks
    total = (precision_at_i * relevant).sum(axis=1)
    denominator = relevant.sum(axis=1) if n_relevant is None else np.minimum(k, np.asarray(n_relevant))
    return np.divide(total, denominator, out=np.zeros_like(total), where=denominator > 0)


def map_at_k(result_labels: np.ndarray, query_labels: np.ndarray, k: int,
             n_relevant: np.ndarray | None = None) -> float:
    return float(average_precision_at_k(result_labels, query_labels, k, n_relevant).mean())


def recall_at_k(ids: np.ndarray, reference_ids: np.ndarray, k: int) -> float:
    """Mean overlap of each row's top-k ids with the reference top-k ids, divided by k (padding never counts)."""
    ids, reference_ids = np.asarray(ids)[:, :k], np.asarray(reference_ids)[:, :k]
    overlap = [len(np.intersect1d(a[a >= 0], b[b >= 0])) for a, b in zip(ids, reference_ids)]
    return float(np.mean(overlap) / k)


def relevant_counts(db_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """How many database items share each query's label (R in AP@k)."""
    db_labels = np.asarray(db_labels)
    counts = np.bincount(db_labels[db_labels >= 0], minlength=int(np.max(query_labels, initial=0)) + 1)
    return counts[np.asarray(query_labels)]


def latencies_ms(call: Callable[[int], object], items: Iterable[int], warmup: int = 2) -> np.ndarray:
    """Wall-clock ms of each call(item), after `warmup` untimed calls (caches, allocator, threads).

    Report the mean where per-query work varies (adaptive, margin-gated funnel), the median where it does not:
    it shrugs off the stalls other processes on the machine cause.
    """
    items = list(items)
    if not items:
        raise ValueError("latency needs at least one item")
    for item in items[:warmup]:
        call(item)
    times = []
    for item in items:
        start = time.perf_counter()
        call(item)
        times.append((time.perf_counter() - start) * 1e3)
    return np.array(times)
