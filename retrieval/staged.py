"""What plain, funnel and adaptive search have in common: a query embedder, stage timers and the result arrays.

Searches are written against `embed(submodel, rows) -> (len(rows), d) unit embeddings` of the query batch's rows,
so the same code serves live queries (encode on demand) and evaluation (embeddings computed once and reused).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from . import knn
from .submodel import Submodel

EmbedFn = Callable[[Submodel, np.ndarray], np.ndarray]


class StageTimer:
    """Milliseconds spent per stage (decode, encode, search, rerank), and which queries of the batch took part."""

    STAGES = ("decode", "encode", "search", "rerank")

    def __init__(self):
        self.entries: list[tuple[str, float, np.ndarray | None]] = []  # (stage, ms, rows; None: every query)

    @contextmanager
    def __call__(self, stage: str, rows: np.ndarray | None = None) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.entries.append((stage, (time.perf_counter() - start) * 1e3, rows))

    def totals(self) -> dict[str, float]:
        """Whole-batch milliseconds per stage."""
        totals = dict.fromkeys(self.STAGES, 0.0)
        for stage, ms, _ in self.entries:
            totals[stage] += ms
        return totals

    def per_query(self, n: int) -> list[dict[str, float]]:
        """Each stage's time shared equally by the queries that took part in it."""
        table = np.zeros((n, len(self.STAGES)))
        for stage, ms, rows in self.entries:
            column = self.STAGES.index(stage)
            if rows is None:
                table[:, column] += ms / max(n, 1)
            elif len(rows):
                table[rows, column] += ms / len(rows)
        return [dict(zip(self.STAGES, map(float, row))) for row in table]


@dataclass
class StagedResult:
    scores: np.ndarray  # (n, k) float32, best first; -inf pads
    ids: np.ndarray  # (n, k) int64; -1 pads
    mflops: np.ndarray  # (n,) query-encoder MFLOPs each query actually spent
    escalated: np.ndarray  # (n,) bool: the larger submodel was used (funnel rerank / adaptive escalation)
    submodels: tuple[Submodel, ...]  # the small one first; escalated queries also used the others

    @property
    def escalation_rate(self) -> float:
        return float(self.escalated.mean()) if len(self.escalated) else 0.0


def plain_search(db: knn.VectorDatabase, embed: EmbedFn, n: int, submodel: Submodel, k: int, config,
                 timer: StageTimer, allowed_ids: np.ndarray | None = None) -> StagedResult:
    """One submodel's query embedding against the index: the baseline every other mode is compared with."""
    queries = embed(submodel, np.arange(n))
    with timer("search"):
        scores, ids = knn.search(db, queries, k, allowed_ids)
    return StagedResult(scores, ids, np.full(n, submodel.mflops(config)), np.zeros(n, dtype=bool), (submodel,))


def escalate_below(margins: np.ndarray, threshold: float) -> np.ndarray:
    """Queries whose gate statistic (e.g. top-1/top-2 margin) is below `threshold`: 0 escalates none, inf all."""
    return np.asarray(margins) < threshold


def parse_two_stage(text: str, what: str, third: str, convert: Callable, example: str):
    """"SMALL:LARGE:THIRD" (e.g. "D/8:D:100") -> (small Submodel, large Submodel, convert(THIRD))."""
    parts = str(text).replace("mnm:", "").split(":")
    if len(parts) != 3:
        raise ValueError(f"{what} {text!r} should read SMALL:LARGE:{third.upper()}, e.g. {example}")
    try:
        value = convert(parts[2])
    except ValueError as e:  # int/float say little; other converters (e.g. Gate.parse) explain themselves
        detail = f"the {third} {parts[2]!r} is not a valid {convert.__name__}" if convert in (int, float) else e
        raise ValueError(f"{what} {text!r}: {detail}") from None
    return Submodel.parse(parts[0]), Submodel.parse(parts[1]), value
