"""Funnel retrieval: shortlist with a cheap submodel, rerank the shortlist with a larger one.

1. The small submodel's query embedding finds `shortlist` candidates in the FAISS index.
2. The large submodel's query embedding re-scores them by exact dot products with the stored full-model vectors.

The honest cost of a query is *both* encodes (small + large), so an always-on funnel costs more than the large
submodel alone; its point is a cheaper *search* over a huge index, not a cheaper encode. With
`rerank_when="margin"` only uncertain queries (shortlist top-1/top-2 margin below `margin`) pay for the large
encode, so the average cost can sit well under the full model's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import knn
from .staged import EmbedFn, StagedResult, StageTimer, escalate_below, parse_two_stage
from .submodel import Submodel

RERANK_WHEN = ("always", "margin")


@dataclass(frozen=True)
class Funnel:
    small: Submodel = field(default_factory=lambda: Submodel(level=8))
    large: Submodel = field(default_factory=lambda: Submodel(level=1))
    shortlist: int = 100  # candidates the small submodel passes on (at least k are always kept)
    rerank_when: str = "always"  # "always", or "margin": only queries whose shortlist margin < margin
    margin: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "small", Submodel.coerce(self.small))
        object.__setattr__(self, "large", Submodel.coerce(self.large))
        if self.shortlist < 1:
            raise ValueError(f"funnel shortlist must be >= 1, got {self.shortlist}")
        if self.rerank_when not in RERANK_WHEN:
            raise ValueError(f"rerank_when must be one of {RERANK_WHEN}, got {self.rerank_when!r}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")

    @property
    def name(self) -> str:
        gate = f" if margin<{self.margin:.3g}" if self.rerank_when == "margin" else ""
        return f"funnel {self.small.name}->{self.large.name} @{self.shortlist}{gate}"

    @classmethod
    def parse(cls, text: str, margin: float | None = None) -> "Funnel":
        """"SMALL:LARGE:SHORTLIST", e.g. "8:1:100" or "D/8:D:100"; a margin makes it margin-gated."""
        small, large, shortlist = parse_two_stage(text, "funnel", "shortlist size", int, "8:1:100 or D/8:D:100")
        gated = {"rerank_when": "margin", "margin": margin} if margin is not None else {}
        return cls(small, large, shortlist, **gated)

    def mflops(self, config, rerank_rate: float = 1.0) -> float:
        """Average query MFLOPs when a fraction `rerank_rate` of queries is reranked."""
        return self.small.mflops(config) + rerank_rate * self.large.mflops(config)


def funnel_search(db: knn.VectorDatabase, embed: EmbedFn, n: int, funnel: Funnel, k: int, config,
                  timer: StageTimer, allowed_ids: np.ndarray | None = None) -> StagedResult:
    rows = np.arange(n)
    small = embed(funnel.small, rows)
    with timer("search"):
        short_scores, short_ids = knn.search(db, small, max(funnel.shortlist, k, 2), allowed_ids)
    rerank = np.ones(n, dtype=bool) if funnel.rerank_when == "always" else \
        escalate_below(knn.top1_margin(short_scores), funnel.margin)

    scores, ids = short_scores[:, :k].copy(), short_ids[:, :k].copy()
    if rerank.any():
        large = embed(funnel.large, rows[rerank])
        with timer("rerank", rows[rerank]):
            scores[rerank], ids[rerank] = knn.rerank(db, large, short_ids[rerank], k)
    mflops = funnel.small.mflops(config) + rerank * funnel.large.mflops(config)
    return StagedResult(scores, ids, mflops, rerank, (funnel.small, funnel.large))
