"""Funnel retrieval: shortlist with a cheap submodel, rerank the shortlist with a larger one.

1. The small submodel's query embedding finds `shortlist` candidates in the FAISS index.
2. The large submodel's query embedding re-scores them by exact dot products with the stored full-model vectors.

The honest cost of a query is *both* encodes (small + large), so an always-on funnel costs more than the large
submodel alone; its point is a cheaper *search* over a huge index, not a cheaper encode. A gated funnel reranks
only the queries whose shortlist looks uncertain (see retrieval/gate.py), so the average cost can sit well under
the full model's:

    Funnel("D/8", "D", 100)                                    # rerank every query
    Funnel("D/8", "D", 100, "margin", margin=0.02)             # rerank when the top-1/top-2 margin < 0.02
    Funnel("D/8", "D", 100, "vote", vote=0.6)                  # rerank when < 60% of the top 10 share the
    Funnel("D/8", "D", 100, "vote", vote=0.6, vote_k=20)       #   top-1's label (of the top 20)
    Funnel.from_gate("D/8", "D", 100, Gate("vote", 0.6))
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import knn
from .gate import DEFAULT_VOTE, DEFAULT_VOTE_K, GATES, Gate
from .staged import EmbedFn, StagedResult, StageTimer, parse_two_stage
from .submodel import Submodel

RERANK_WHEN = ("always",) + GATES


@dataclass(frozen=True)
class Funnel:
    small: Submodel = field(default_factory=lambda: Submodel(level=8))
    large: Submodel = field(default_factory=lambda: Submodel(level=1))
    shortlist: int = 100  # candidates the small submodel passes on (at least k are always kept)
    rerank_when: str = "always"  # "always", "margin" (shortlist margin < margin) or "vote" (agreeing share < vote)
    margin: float = 0.0  # the margin gate's threshold
    vote: float = DEFAULT_VOTE  # the vote gate's threshold: a fraction of the top vote_k results, in (0, 1]
    vote_k: int = DEFAULT_VOTE_K  # the vote gate: how many of the shortlist's top results vote

    def __post_init__(self):
        object.__setattr__(self, "small", Submodel.coerce(self.small))
        object.__setattr__(self, "large", Submodel.coerce(self.large))
        if self.shortlist < 1:
            raise ValueError(f"funnel shortlist must be >= 1, got {self.shortlist}")
        if self.rerank_when not in RERANK_WHEN:
            raise ValueError(f"rerank_when must be one of {RERANK_WHEN}, got {self.rerank_when!r}")
        if not self.margin >= 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        self.escalation_gate  # validates the vote settings of a vote-gated funnel

    @property
    def escalation_gate(self) -> Gate | None:
        """The rerank gate; None for a funnel that reranks every query."""
        if self.rerank_when == "margin":
            return Gate("margin", self.margin)
        if self.rerank_when == "vote":
            return Gate("vote", self.vote, self.vote_k)
        return None

    @classmethod
    def from_gate(cls, small, large, shortlist: int, gate: Gate | None) -> "Funnel":
        """A funnel that reranks the queries `gate` escalates (every query for None)."""
        if gate is None:
            return cls(small, large, shortlist)
        if gate.kind == "vote":
            return cls(small, large, shortlist, "vote", vote=gate.threshold, vote_k=gate.vote_k)
        return cls(small, large, shortlist, "margin", margin=gate.threshold)

    @property
    def name(self) -> str:
        gate = self.escalation_gate
        return f"funnel {self.small.name}->{self.large.name} @{self.shortlist}" + (f" if {gate.label}" if gate else "")

    @classmethod
    def parse(cls, text: str, margin: float | None = None, vote: float | None = None,
              vote_k: int = DEFAULT_VOTE_K) -> "Funnel":
        """"SMALL:LARGE:SHORTLIST", e.g. "8:1:100" or "D/8:D:100"; a margin or a vote threshold gates it."""
        small, large, shortlist = parse_two_stage(text, "funnel", "shortlist size", int, "8:1:100 or D/8:D:100")
        if margin is not None and vote is not None:
            raise ValueError("a funnel is gated by the score margin or by the label vote, not both")
        if margin is not None:
            return cls(small, large, shortlist, "margin", margin=margin)
        if vote is not None:
            return cls(small, large, shortlist, "vote", vote=vote, vote_k=vote_k)
        return cls(small, large, shortlist)

    def mflops(self, config, rerank_rate: float = 1.0) -> float:
        """Average query MFLOPs when a fraction `rerank_rate` of queries is reranked."""
        return self.small.mflops(config) + rerank_rate * self.large.mflops(config)


def funnel_search(db: knn.VectorDatabase, embed: EmbedFn, n: int, funnel: Funnel, k: int, config,
                  timer: StageTimer, allowed_ids: np.ndarray | None = None) -> StagedResult:
    gate = funnel.escalation_gate
    if gate is not None:
        gate.check(db)  # e.g. a vote without labels: fail before any encode
    rows = np.arange(n)
    small = embed(funnel.small, rows)
    candidates = max(funnel.shortlist, k)
    with timer("search"):
        short_scores, short_ids = knn.search(db, small, max(candidates, gate.depth if gate else 1), allowed_ids)
    rerank = np.ones(n, dtype=bool) if gate is None else gate.escalate(db, short_scores, short_ids)
    short_scores, short_ids = short_scores[:, :candidates], short_ids[:, :candidates]

    scores, ids = short_scores[:, :k].copy(), short_ids[:, :k].copy()
    if rerank.any():
        large = embed(funnel.large, rows[rerank])
        with timer("rerank", rows[rerank]):
            scores[rerank], ids[rerank] = knn.rerank(db, large, short_ids[rerank], k)
    mflops = funnel.small.mflops(config) + rerank * funnel.large.mflops(config)
    return StagedResult(scores, ids, mflops, rerank, (funnel.small, funnel.large))
