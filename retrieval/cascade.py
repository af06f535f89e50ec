"""Two-stage (cascade) retrieval: answer with a cheap submodel, let the queries a gate escalates pay for a larger one.

Every query is encoded by `small` and searched. The queries the gate calls uncertain (retrieval/gate.py; no gate:
every query) are encoded again by `large`, and stage 2 is one of two things:

- "rerank" (the funnel): the large embedding re-scores the small submodel's shortlist of `shortlist` candidates by
  exact dot products with the stored full-model vectors. Its point is a cheaper *search* over a huge index; an
  always-on funnel costs both encodes, more than the large submodel alone.
- "search" (input-adaptive): the large embedding searches the whole index again.

Average cost per query = small + escalation_rate * large MFLOPs. `Funnel(...)` and `Adaptive(...)` build the two
kinds with the words the CLI, the UI and the evaluation records use:

    Funnel("D/8", "D", 100)                                    # rerank every query
    Funnel("D/8", "D", 100, "margin", margin=0.02)             # rerank when the top-1/top-2 margin < 0.02
    Funnel("D/8", "D", 100, "vote", vote=0.6, vote_k=20)       # rerank when < 60% of the top 20 share the top-1's label
    Adaptive("D/8", "D", margin=0.02)                          # escalate to a whole search with D below that margin
    Adaptive("D/8", "D", gate="vote", vote=0.6)                # ... or by the label vote (needs database labels)
    Cascade.funnel("D/8", "D", 100, Gate("vote", 0.6))         # the same from a Gate object
    Cascade.adaptive("D/8", "D", Gate("margin", 0.02))

The threshold that gives a wanted escalation rate depends on the model and the data: `gate.calibrate_margin` and
`gate.calibrate_vote` find it on held-out queries (never the test set).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import knn
from .gate import DEFAULT_VOTE, DEFAULT_VOTE_K, GATES, Gate
from .staged import EmbedFn, StagedResult, StageTimer, parse_two_stage
from .submodel import Submodel

STAGE2 = ("rerank", "search")
KINDS = {"rerank": "funnel", "search": "adaptive"}  # what the CLI, the UI and the eval records call each stage 2
RERANK_WHEN = ("always",) + GATES


@dataclass(frozen=True)
class Cascade:
    small: Submodel = field(default_factory=lambda: Submodel(level=8))
    large: Submodel = field(default_factory=lambda: Submodel(level=1))
    stage2: str = "rerank"  # "rerank" the small submodel's shortlist, or "search" the whole index again
    gate: Gate | None = None  # which queries take stage 2 (None: every query; "search" needs one)
    shortlist: int = 100  # rerank: candidates the small submodel passes on (at least k are always kept)

    def __post_init__(self):
        object.__setattr__(self, "small", Submodel.coerce(self.small))
        object.__setattr__(self, "large", Submodel.coerce(self.large))
        if self.stage2 not in STAGE2:
            raise ValueError(f"a cascade's stage 2 is one of {STAGE2}, got {self.stage2!r}")
        if self.stage2 == "search" and self.gate is None:
            raise ValueError("an adaptive search needs a gate (a margin of inf escalates every query)")
        if self.shortlist < 1:
            raise ValueError(f"funnel shortlist must be >= 1, got {self.shortlist}")

    # -- the two kinds ---------------------------------------------------------------------------------------------
    @classmethod
    def funnel(cls, small, large, shortlist: int = 100, gate: Gate | None = None) -> "Cascade":
        """Rerank the shortlist of the queries `gate` escalates (every query for None)."""
        return cls(small, large, "rerank", gate, shortlist)

    @classmethod
    def adaptive(cls, small, large, gate: Gate) -> "Cascade":
        """Search the whole index again with `large` for the queries `gate` escalates."""
        return cls(small, large, "search", gate)

    @classmethod
    def parse_funnel(cls, text: str, margin: float | None = None, vote: float | None = None,
                     vote_k: int = DEFAULT_VOTE_K) -> "Cascade":
        """"SMALL:LARGE:SHORTLIST", e.g. "8:1:100" or "D/8:D:100"; a margin or a vote threshold gates it."""
        small, large, shortlist = parse_two_stage(text, "funnel", "shortlist size", int, "8:1:100 or D/8:D:100")
        if margin is not None and vote is not None:
            raise ValueError("a funnel is gated by the score margin or by the label vote, not both")
        gate = Gate("margin", margin) if margin is not None else Gate("vote", vote, vote_k) if vote is not None \
            else None
        return cls.funnel(small, large, shortlist, gate)

    @classmethod
    def parse_adaptive(cls, text: str, vote_k: int = DEFAULT_VOTE_K) -> "Cascade":
        """"SMALL:LARGE:GATE", GATE a margin ("0.02" or "margin0.02") or a vote threshold ("vote0.6"), e.g.
        "8:1:0.02", "D/8:D:0.02" or "D/8:D:vote0.6"; `vote_k` results vote."""
        small, large, gate = parse_two_stage(text, "adaptive", "gate", lambda t: Gate.parse(t, vote_k),
                                             "D/8:D:0.02 (score margin) or D/8:D:vote0.6 (label vote)")
        return cls.adaptive(small, large, gate)

    # -- description -----------------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """"funnel" or "adaptive"."""
        return KINDS[self.stage2]

    @property
    def name(self) -> str:
        """e.g. "funnel D/8->D @100 if vote@10<0.8" or "adaptive D/8->D if margin<0.02" (eval records match it)."""
        name = f"{self.kind} {self.small.name}->{self.large.name}"
        if self.stage2 == "rerank":
            name += f" @{self.shortlist}"
        return name + (f" if {self.gate.label}" if self.gate else "")

    @property
    def escalated_word(self) -> str:
        """What happened to an escalated query: "reranked" or "escalated"."""
        return "reranked" if self.stage2 == "rerank" else "escalated"

    def mflops(self, config, escalation_rate: float = 1.0) -> float:
        """Average query MFLOPs when a fraction `escalation_rate` of queries takes stage 2."""
        return self.small.mflops(config) + escalation_rate * self.large.mflops(config)


def Funnel(small=None, large=None, shortlist: int = 100, rerank_when: str = "always", margin: float = 0.0,
           vote: float = DEFAULT_VOTE, vote_k: int = DEFAULT_VOTE_K) -> Cascade:
    """A funnel: shortlist with `small`, rerank with `large` every query ("always") or the uncertain ones
    ("margin": shortlist margin < margin; "vote": agreeing share of the top vote_k < vote)."""
    if rerank_when not in RERANK_WHEN:
        raise ValueError(f"rerank_when must be one of {RERANK_WHEN}, got {rerank_when!r}")
    gate = None if rerank_when == "always" else Gate("vote", vote, vote_k) if rerank_when == "vote" \
        else Gate("margin", margin)
    return Cascade.funnel(Submodel(level=8) if small is None else small, Submodel(level=1) if large is None else large,
                          shortlist, gate)


def Adaptive(small=None, large=None, margin: float = 0.05, gate: str = "margin", vote: float = DEFAULT_VOTE,
             vote_k: int = DEFAULT_VOTE_K) -> Cascade:
    """Input-adaptive search: answer with `small`, search again with `large` for the queries whose small-submodel
    top-1/top-2 margin is below `margin` (gate="margin") or whose agreeing share of the top vote_k is below `vote`
    (gate="vote")."""
    if gate not in GATES:
        raise ValueError(f"adaptive gate must be one of {GATES}, got {gate!r}")
    chosen = Gate("vote", vote, vote_k) if gate == "vote" else Gate("margin", margin)
    return Cascade.adaptive(Submodel(level=8) if small is None else small,
                            Submodel(level=1) if large is None else large, chosen)


def cascade_search(db: knn.VectorDatabase, embed: EmbedFn, n: int, cascade: Cascade, k: int, config,
                   timer: StageTimer, allowed_ids: np.ndarray | None = None) -> StagedResult:
    gate = cascade.gate
    if gate is not None:
        gate.check(db)  # e.g. a vote without labels: fail before any encode
    rows = np.arange(n)
    small = embed(cascade.small, rows)
    candidates = max(cascade.shortlist, k) if cascade.stage2 == "rerank" else k
    with timer("search"):  # deep enough for the shortlist and for what the gate looks at
        scores, ids = knn.search(db, small, max(candidates, gate.depth if gate else 1), allowed_ids)
    escalate = np.ones(n, dtype=bool) if gate is None else gate.escalate(db, scores, ids)
    shortlist = ids[:, :candidates]
    scores, ids = scores[:, :k].copy(), ids[:, :k].copy()
    if escalate.any():
        large = embed(cascade.large, rows[escalate])
        if cascade.stage2 == "rerank":
            with timer("rerank", rows[escalate]):
                scores[escalate], ids[escalate] = knn.rerank(db, large, shortlist[escalate], k)
        else:
            with timer("search", rows[escalate]):
                scores[escalate], ids[escalate] = knn.search(db, large, k, allowed_ids)
    mflops = cascade.small.mflops(config) + escalate * cascade.large.mflops(config)
    return StagedResult(scores, ids, mflops, escalate, (cascade.small, cascade.large))
