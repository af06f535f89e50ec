"""Input-adaptive retrieval: answer with a small submodel, escalate only the queries it is unsure of.

Every query is first encoded by `small` and searched. A query the gate calls uncertain (retrieval/gate.py) is
encoded again by `large` and searched again over the whole index (not just a shortlist, unlike the funnel):

    Adaptive("D/8", "D", margin=0.02)                    # escalate when the top-1/top-2 score margin < 0.02
    Adaptive("D/8", "D", gate="vote", vote=0.6)          # escalate when < 60% of the top 10 results share the
                                                         #   top-1 result's label (needs database labels)
    Adaptive.from_gate("D/8", "D", Gate("vote", 0.6, vote_k=20))

Average cost per query = small + escalation_rate * large MFLOPs.

The threshold that gives a wanted escalation rate depends on the model and the data: `calibrate_margin` and
`calibrate_vote` find it on held-out queries (never the test set), e.g. Fashion-MNIST *train* images, from
`held_out_margins` / `held_out_votes`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import knn
from .gate import (DEFAULT_VOTE, DEFAULT_VOTE_K, GATES, Gate, calibrate_gate, calibrate_margin, calibrate_vote,
                   held_out_margins, held_out_statistic, held_out_votes)
from .staged import EmbedFn, StagedResult, StageTimer, parse_two_stage
from .submodel import Submodel

__all__ = ["Adaptive", "adaptive_search", "Gate", "calibrate_gate", "calibrate_margin", "calibrate_vote",
           "held_out_margins", "held_out_statistic", "held_out_votes"]  # calibration lives in gate.py


@dataclass(frozen=True)
class Adaptive:
    small: Submodel = field(default_factory=lambda: Submodel(level=8))
    large: Submodel = field(default_factory=lambda: Submodel(level=1))
    margin: float = 0.05  # the margin gate: escalate queries whose small-submodel top-1/top-2 margin is below this
    gate: str = "margin"  # "margin" or "vote"
    vote: float = DEFAULT_VOTE  # the vote gate: escalate when fewer than this fraction of the top vote_k agree
    vote_k: int = DEFAULT_VOTE_K

    def __post_init__(self):
        object.__setattr__(self, "small", Submodel.coerce(self.small))
        object.__setattr__(self, "large", Submodel.coerce(self.large))
        if self.gate not in GATES:
            raise ValueError(f"adaptive gate must be one of {GATES}, got {self.gate!r}")
        if not self.margin >= 0:
            raise ValueError(f"adaptive margin must be >= 0 (inf escalates every query), got {self.margin}")
        self.escalation_gate  # validates the vote settings of a vote-gated search

    @property
    def escalation_gate(self) -> Gate:
        return Gate("vote", self.vote, self.vote_k) if self.gate == "vote" else Gate("margin", self.margin)

    @classmethod
    def from_gate(cls, small, large, gate: Gate) -> "Adaptive":
        if gate.kind == "vote":
            return cls(small, large, gate="vote", vote=gate.threshold, vote_k=gate.vote_k)
        return cls(small, large, margin=gate.threshold)

    @property
    def name(self) -> str:
        return f"adaptive {self.small.name}->{self.large.name} if {self.escalation_gate.label}"

    @classmethod
    def parse(cls, text: str, vote_k: int = DEFAULT_VOTE_K) -> "Adaptive":
        """"SMALL:LARGE:GATE", GATE a margin ("0.02" or "margin0.02") or a vote threshold ("vote0.6"), e.g.
        "8:1:0.02", "D/8:D:0.02" or "D/8:D:vote0.6"; `vote_k` results vote."""
        small, large, gate = parse_two_stage(text, "adaptive", "gate", lambda t: Gate.parse(t, vote_k),
                                             "D/8:D:0.02 (score margin) or D/8:D:vote0.6 (label vote)")
        return cls.from_gate(small, large, gate)

    def mflops(self, config, escalation_rate: float) -> float:
        return self.small.mflops(config) + escalation_rate * self.large.mflops(config)


def adaptive_search(db: knn.VectorDatabase, embed: EmbedFn, n: int, adaptive: Adaptive, k: int, config,
                    timer: StageTimer, allowed_ids: np.ndarray | None = None) -> StagedResult:
    gate = adaptive.escalation_gate
    gate.check(db)  # e.g. a vote without labels: fail before any encode
    rows = np.arange(n)
    small = embed(adaptive.small, rows)
    with timer("search"):
        scores, ids = knn.search(db, small, max(k, gate.depth), allowed_ids)  # what the gate looks at, at least
    escalate = gate.escalate(db, scores, ids)
    scores, ids = scores[:, :k].copy(), ids[:, :k].copy()
    if escalate.any():
        large = embed(adaptive.large, rows[escalate])
        with timer("search", rows[escalate]):
            scores[escalate], ids[escalate] = knn.search(db, large, k, allowed_ids)
    mflops = adaptive.small.mflops(config) + escalate * adaptive.large.mflops(config)
    return StagedResult(scores, ids, mflops, escalate, (adaptive.small, adaptive.large))
