"""Escalation gates: which queries of a staged search (funnel rerank, adaptive escalation) pay for the large submodel.

A gate looks at the small submodel's results for a query and says "uncertain: escalate" or "confident: keep":

- margin (`Gate("margin", X)`): escalate when the top-1/top-2 score margin is below X (0 escalates none, inf all).
- vote (`Gate("vote", T, vote_k=10)`): escalate when fewer than a fraction T of the top-`vote_k` results carry
  the top-1 result's label, T in (0, 1]. The top-1 result votes for itself, so with every result labelled the
  fraction is at least 1/vote_k and T <= 1/vote_k escalates none; T = 1 escalates every query whose neighbourhood
  is not unanimous. Results that do not count as agreeing: padding (id -1, e.g. fewer than vote_k results in the
  database or the label filter) and results with an unknown label (-1); a query whose top-1 result is unlabelled
  has no label to agree with (fraction 0: escalated). Votes are counts: a fraction f escalates when
  f * vote_k < T * vote_k - 1e-9, so a threshold like 0.1 * 6 counts as exactly 6 votes of 10.
  The vote needs database labels: on a database without any it raises ValueError.

On the shipped model (60k train images, D/8 -> D) the margin barely separates right from wrong D/8 answers, while
the vote does: at T=0.8, k=10, a few percent of the test queries escalate and the funnel beats D alone at a fraction
of its cost (measurements: docs/notes.md, sections 10 and 16).

Thresholds come from held-out queries, never the test set: `held_out_margins` / `held_out_votes` give the gate's
statistic on queries drawn from the database itself (their own row left out) or unseen ones, and
`calibrate_margin` / `calibrate_vote` turn a wanted escalation rate into a threshold.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import knn
from .staged import escalate_below

GATES = ("margin", "vote")
DEFAULT_VOTE_K = 10
DEFAULT_VOTE = 0.8  # escalates a few percent of Fashion-MNIST queries with the shipped model, k=10 (docs/notes.md)
VOTE_EPS = 1e-9
CALIBRATION_SLACK = 0.25  # a calibrated vote threshold may escalate up to 25% more than the wanted rate (see below)


@dataclass(frozen=True)
class Gate:
    kind: str = "margin"  # "margin" or "vote"
    threshold: float = 0.0  # margin: escalate below this margin (>= 0); vote: below this agreeing fraction (0, 1]
    vote_k: int = DEFAULT_VOTE_K  # vote: how many of the small submodel's top results vote

    def __post_init__(self):
        if self.kind not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.kind!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        if self.kind == "margin" and not self.threshold >= 0:
            raise ValueError(f"a margin gate's threshold must be >= 0 (inf escalates every query), got "
                             f"{self.threshold}")
        if self.kind == "vote":
            check_vote(self.threshold, self.vote_k)

    # -- names -----------------------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """"margin<0.02" or "vote@10<0.6": what goes after "if" in a funnel or adaptive setting's name."""
        if self.kind == "vote":
            return f"vote@{self.vote_k}<{self.threshold:.3g}"
        return f"margin<{self.threshold:.3g}"

    def __str__(self) -> str:
        return self.label

    @classmethod
    def parse(cls, text: str, vote_k: int = DEFAULT_VOTE_K) -> "Gate":
        """"0.02" or "margin0.02" -> a margin gate; "vote0.6" -> a vote gate over the top `vote_k` results."""
        spec = str(text).strip().lower()
        kind = next((g for g in GATES if spec.startswith(g)), None)
        number = spec[len(kind):].strip().lstrip("=").strip() if kind else spec
        if not number:
            raise ValueError(f"gate {text!r} names no threshold: write e.g. margin0.02 or vote0.6")
        try:
            threshold = float(number)
        except ValueError:
            raise ValueError(f"gate {text!r} should read X or marginX (score margin) or voteT (label vote), e.g. "
                             "0.02, margin0.02 or vote0.6") from None
        kind = kind or "margin"
        return cls(kind, threshold, vote_k)

    # -- deciding --------------------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Results of the small search the gate looks at: 2 for the margin, vote_k for the vote."""
        return self.vote_k if self.kind == "vote" else 2

    def check(self, db: knn.VectorDatabase) -> None:
        """ValueError if the gate cannot work on this database (a vote without labels), before anything is spent."""
        if self.kind == "vote":
            require_labels(db)

    def statistic(self, db: knn.VectorDatabase, scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Per query: the top-1/top-2 margin, or the fraction of the top vote_k results agreeing with the top-1."""
        if self.kind == "vote":
            return vote_fractions(db, ids, self.vote_k)
        return knn.top1_margin(np.asarray(scores)[:, :2])

    def escalate(self, db: knn.VectorDatabase, scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(n,) bool: the queries whose small-submodel results (scores, ids), best first, are uncertain."""
        return self.escalate_statistic(self.statistic(db, scores, ids))

    def escalate_statistic(self, statistic: np.ndarray) -> np.ndarray:
        if self.kind == "vote":
            return escalate_below(statistic, self.threshold - VOTE_EPS)
        return escalate_below(statistic, self.threshold)


def check_vote(threshold: float, vote_k: int) -> None:
    if isinstance(vote_k, bool) or not isinstance(vote_k, (int, np.integer)) or vote_k < 2:
        raise ValueError(f"vote_k (results that vote) must be an int >= 2, got {vote_k!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"a vote gate's threshold is a fraction of the top {vote_k} results, in (0, 1], got "
                         f"{threshold}")


# -- labels ------------------------------------------------------------------------------------------------------------
def require_labels(db: knn.VectorDatabase) -> None:
    if not knn.has_labels(db):
        raise ValueError("the vote gate needs database labels, and this database has none (every label is -1, e.g. "
                         "an index of an unlabelled image folder): use the margin gate instead "
                         "(rerank_when='margin' / gate='margin'; on the command line --rerank-margin X or "
                         "--adaptive SMALL:LARGE:X)")


def vote_fractions(db: knn.VectorDatabase, ids: np.ndarray, vote_k: int = DEFAULT_VOTE_K) -> np.ndarray:
    """(n,) fraction of each query's top `vote_k` result ids (n, >= 1), best first, that carry the top-1 result's
    label; padding ids (-1), unknown labels and missing columns never agree (see the module docstring)."""
    ids = np.asarray(ids, dtype=np.int64)[:, :vote_k]
    labels = knn.labels_of(db, ids)
    top = labels[:, :1]
    agree = (labels == top) & (top >= 0)
    return agree.sum(axis=1) / float(vote_k)


# -- calibration on held-out queries -------------------------------------------------------------------------------
def held_out_results(db: knn.VectorDatabase, queries: np.ndarray, depth: int,
                     exclude_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-`depth` (scores, ids) of query embeddings; `exclude_ids[i]` (if >= 0) is query i's own database row,
    which is left out, so that queries drawn from the indexed images calibrate like unseen ones."""
    scores, ids = db.search(np.ascontiguousarray(queries, dtype=np.float32), depth + 1)
    if exclude_ids is not None:
        own = ids == np.asarray(exclude_ids, dtype=np.int64)[:, None]
        order = np.argsort(own, axis=1, kind="stable")  # own row last, the rest in rank order
        own = np.take_along_axis(own, order, axis=1)
        scores = np.where(own, -np.inf, np.take_along_axis(scores, order, axis=1))
        ids = np.where(own, -1, np.take_along_axis(ids, order, axis=1))
    return scores[:, :depth], ids[:, :depth]


def held_out_margins(db: knn.VectorDatabase, queries: np.ndarray, exclude_ids: np.ndarray | None = None) -> np.ndarray:
    """Top-1/top-2 margins of query embeddings, own database rows (`exclude_ids`) left out."""
    scores, _ = held_out_results(db, queries, 2, exclude_ids)
    return knn.top1_margin(scores)


def held_out_votes(db: knn.VectorDatabase, queries: np.ndarray, exclude_ids: np.ndarray | None = None,
                   vote_k: int = DEFAULT_VOTE_K) -> np.ndarray:
    """Agreeing fractions of the top `vote_k` results of query embeddings, own database rows left out."""
    require_labels(db)
    _, ids = held_out_results(db, queries, vote_k, exclude_ids)
    return vote_fractions(db, ids, vote_k)


def _check_rate(escalation_rate: float) -> None:
    if not 0 <= escalation_rate <= 1:
        raise ValueError(f"escalation rate must be in [0, 1], got {escalation_rate}")


def calibrate_margin(margins: np.ndarray, escalation_rate: float) -> float:
    """The margin threshold that escalates about `escalation_rate` of queries with these held-out margins."""
    _check_rate(escalation_rate)
    margins = np.asarray(margins, dtype=np.float64)
    if escalation_rate == 0 or len(margins) == 0:
        return 0.0
    if escalation_rate == 1:
        return float("inf")
    # escalate_below uses "<": the rate-quantile itself is the threshold
    return float(np.quantile(margins[np.isfinite(margins)], escalation_rate)) if np.isfinite(margins).any() else 0.0


def calibrate_vote(fractions: np.ndarray, escalation_rate: float, vote_k: int = DEFAULT_VOTE_K) -> float:
    """The vote threshold that escalates about `escalation_rate` of queries with these held-out agreeing fractions.

    Votes are counts, so only the thresholds j/vote_k (j = 1..vote_k) differ; T = j/vote_k escalates the queries
    with fewer than j agreeing results, at held-out rate r_j (growing with j). The rule: among the thresholds with
    r_j <= escalation_rate * (1 + CALIBRATION_SLACK), i.e. at most a quarter over the wanted rate, the one whose
    r_j is closest to it (the smaller threshold on a tie); if even 1/vote_k escalates more than that, 1/vote_k.
    A vote gate cannot escalate more than the non-unanimous queries: a rate above r_{vote_k} gives 1.
    """
    _check_rate(escalation_rate)
    check_vote(1.0, vote_k)
    counts = np.rint(np.asarray(fractions, dtype=np.float64) * vote_k)
    thresholds = np.arange(1, vote_k + 1)
    if len(counts) == 0:
        return 1.0 / vote_k
    rates = (counts[None, :] < thresholds[:, None]).mean(axis=1)
    allowed = rates <= escalation_rate * (1 + CALIBRATION_SLACK) + 1e-12
    if not allowed.any():
        return 1.0 / vote_k
    distance = np.where(allowed, np.abs(rates - escalation_rate), np.inf)
    return float(thresholds[int(np.argmin(distance))] / vote_k)  # argmin: the first (smallest) on a tie


def held_out_statistic(gate_kind: str, db: knn.VectorDatabase, queries: np.ndarray,
                       exclude_ids: np.ndarray | None = None, vote_k: int = DEFAULT_VOTE_K) -> np.ndarray:
    """The gate's statistic (margins or agreeing fractions) on held-out query embeddings."""
    if gate_kind == "vote":
        return held_out_votes(db, queries, exclude_ids, vote_k)
    if gate_kind == "margin":
        return held_out_margins(db, queries, exclude_ids)
    raise ValueError(f"gate must be one of {GATES}, got {gate_kind!r}")


def calibrate_gate(gate_kind: str, statistic: np.ndarray, escalation_rate: float,
                   vote_k: int = DEFAULT_VOTE_K) -> Gate:
    """A gate of this kind calibrated on held-out statistics (`held_out_statistic`) for a wanted escalation rate."""
    if gate_kind == "vote":
        return Gate("vote", calibrate_vote(statistic, escalation_rate, vote_k), vote_k)
    if gate_kind == "margin":
        return Gate("margin", calibrate_margin(statistic, escalation_rate))
    raise ValueError(f"gate must be one of {GATES}, got {gate_kind!r}")
