"""Input-adaptive retrieval: answer with a small submodel, escalate only the queries it is unsure of.

Every query is first encoded by `small` and searched. A query whose top-1/top-2 score margin is below `margin`
is encoded again by `large` and searched again over the whole index (not just a shortlist, unlike the funnel).
Average cost per query = small + escalation_rate * large MFLOPs.

The margin that gives a wanted escalation rate depends on the model and the data: `calibrate_margin` finds it
on held-out queries (never the test set), e.g. Fashion-MNIST *train* images.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import knn
from .staged import EmbedFn, StagedResult, StageTimer, escalate_below, parse_two_stage
from .submodel import Submodel


@dataclass(frozen=True)
class Adaptive:
    small: Submodel = field(default_factory=lambda: Submodel(level=8))
    large: Submodel = field(default_factory=lambda: Submodel(level=1))
    margin: float = 0.05  # escalate queries whose small-submodel top-1/top-2 margin is below this

    def __post_init__(self):
        object.__setattr__(self, "small", Submodel.coerce(self.small))
        object.__setattr__(self, "large", Submodel.coerce(self.large))
        if not self.margin >= 0:
            raise ValueError(f"adaptive margin must be >= 0 (inf escalates every query), got {self.margin}")

    @property
    def name(self) -> str:
        return f"adaptive {self.small.name}->{self.large.name} if margin<{self.margin:.3g}"

    @classmethod
    def parse(cls, text: str) -> "Adaptive":
        """"SMALL:LARGE:MARGIN", e.g. "8:1:0.02" or "D/8:D:0.02"."""
        return cls(*parse_two_stage(text, "adaptive", "margin", float, "8:1:0.02 or D/8:D:0.02"))

    def mflops(self, config, escalation_rate: float) -> float:
        return self.small.mflops(config) + escalation_rate * self.large.mflops(config)


def adaptive_search(db: knn.VectorDatabase, embed: EmbedFn, n: int, adaptive: Adaptive, k: int, config,
                    timer: StageTimer, allowed_ids: np.ndarray | None = None) -> StagedResult:
    rows = np.arange(n)
    small = embed(adaptive.small, rows)
    with timer("search"):
        scores, ids = knn.search(db, small, max(k, 2), allowed_ids)  # two results at least, for the margin
    escalate = escalate_below(knn.top1_margin(scores), adaptive.margin)
    scores, ids = scores[:, :k].copy(), ids[:, :k].copy()
    if escalate.any():
        large = embed(adaptive.large, rows[escalate])
        with timer("search", rows[escalate]):
            scores[escalate], ids[escalate] = knn.search(db, large, k, allowed_ids)
    mflops = adaptive.small.mflops(config) + escalate * adaptive.large.mflops(config)
    return StagedResult(scores, ids, mflops, escalate, (adaptive.small, adaptive.large))


# -- calibration -----------------------------------------------------------------------------------------------------
def held_out_margins(db: knn.VectorDatabase, queries: np.ndarray, exclude_ids: np.ndarray | None = None) -> np.ndarray:
    """Top-1/top-2 margins of query embeddings; `exclude_ids[i]` (if >= 0) is query i's own database row, which
    is ignored, so that queries drawn from the indexed images calibrate like unseen ones."""
    scores, ids = db.search(np.ascontiguousarray(queries, dtype=np.float32), 3)
    if exclude_ids is not None:
        own = ids == np.asarray(exclude_ids, dtype=np.int64)[:, None]
        order = np.argsort(own, axis=1, kind="stable")  # own row last, the rest in rank order
        scores = np.where(np.take_along_axis(own, order, axis=1), -np.inf, np.take_along_axis(scores, order, axis=1))
    return knn.top1_margin(scores[:, :2])


def calibrate_margin(margins: np.ndarray, escalation_rate: float) -> float:
    """The margin threshold that escalates about `escalation_rate` of queries with these held-out margins."""
    if not 0 <= escalation_rate <= 1:
        raise ValueError(f"escalation rate must be in [0, 1], got {escalation_rate}")
    margins = np.asarray(margins, dtype=np.float64)
    if escalation_rate == 0 or len(margins) == 0:
        return 0.0
    if escalation_rate == 1:
        return float("inf")
    # escalate_below uses "<": the rate-quantile itself is the threshold
    return float(np.quantile(margins[np.isfinite(margins)], escalation_rate)) if np.isfinite(margins).any() else 0.0
