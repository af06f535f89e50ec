"""Budget -> submodel at query time: the stored accuracy/cost Pareto frontier of a model and a picker.

The frontier is measured offline by `evaluation.frontier` (`matsearch budget --model DIR`) and stored beside the
model as `pareto.json`, with the weights hash it was measured for:

    Frontier.load(DIR).select(budget_mflops=80)      # the most accurate frontier submodel within 80 MFLOPs
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

import vision_model
from vision_model.fileio import atomic_write

from .submodel import Submodel

FRONTIER_FILE = "pareto.json"
FORMAT = "matsearch-pareto"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FrontierPoint:
    submodel: Submodel
    top1: float  # 1-NN accuracy on the held-out queries
    recall_at_10: float  # overlap with the full model's top 10
    query_mflops: float
    latency_ms: float  # batch-1 encode + search (median), where the frontier was computed

    def to_dict(self) -> dict:
        return {"setting": self.submodel.name, "submodel": self.submodel.to_dict(), "top1": self.top1,
                "recall@10": self.recall_at_10, "query_mflops": self.query_mflops, "latency_ms": self.latency_ms}

    @classmethod
    def from_dict(cls, d: dict) -> "FrontierPoint":
        return cls(Submodel.from_dict(d["submodel"]), d["top1"], d["recall@10"], d["query_mflops"], d["latency_ms"])


def pareto_front(points: Iterable[FrontierPoint]) -> list[FrontierPoint]:
    """Points no other point beats on both MFLOPs (lower) and top-1 (higher), cheapest first."""
    front, best_top1 = [], -np.inf
    for point in sorted(points, key=lambda p: (p.query_mflops, -p.top1)):
        if point.top1 > best_top1:
            front.append(point)
            best_top1 = point.top1
    return front


# -- the stored frontier -----------------------------------------------------------------------------------------------
@dataclass
class Frontier:
    points: list[FrontierPoint]  # the Pareto frontier, cheapest first
    evaluated: list[FrontierPoint] = field(default_factory=list)  # everything measured
    meta: dict = field(default_factory=dict)  # model, weights hash, held-out split, machine

    @staticmethod
    def path(model_dir: str | Path) -> Path:
        return Path(model_dir) / FRONTIER_FILE

    @classmethod
    def exists(cls, model_dir: str | Path) -> bool:
        return cls.path(model_dir).is_file()

    @classmethod
    def load(cls, model_dir: str | Path, check_weights: bool = True) -> "Frontier":
        path = cls.path(model_dir)
        if not path.is_file():
            raise FileNotFoundError(f"no budget frontier at {path}: compute it with "
                                    f"`matsearch budget --model {model_dir}` (a few minutes on a CPU)")
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} file: compute it again")
        if check_weights:
            actual = vision_model.weights_hash(model_dir)
            if doc["meta"]["weights_sha256"] != actual:
                raise ValueError(f"{path} was computed for other weights (sha256 {doc['meta']['weights_sha256'][:16]}"
                                 f"…) than the model in {model_dir} ({actual[:16]}…): compute it again")
        return cls([FrontierPoint.from_dict(p) for p in doc["frontier"]],
                   [FrontierPoint.from_dict(p) for p in doc["evaluated"]], doc["meta"])

    def save(self, model_dir: str | Path) -> Path:
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "meta": self.meta,
               "frontier": [p.to_dict() for p in self.points], "evaluated": [p.to_dict() for p in self.evaluated]}
        path = self.path(model_dir)
        atomic_write(path, json.dumps(doc, indent=2).encode())
        return path

    def select(self, budget_mflops: float | None = None, budget_ms: float | None = None) -> FrontierPoint:
        """The most accurate frontier point within the budget(s) (the cheaper one on a tie)."""
        fits = [p for p in self.points
                if (budget_mflops is None or p.query_mflops <= budget_mflops)
                and (budget_ms is None or p.latency_ms <= budget_ms)]
        if not fits:
            cheapest = min(self.points, key=lambda p: p.query_mflops)
            fastest = min(self.points, key=lambda p: p.latency_ms)
            wanted = " and ".join(s for s in (budget_mflops is not None and f"{budget_mflops:g} MFLOPs",
                                              budget_ms is not None and f"{budget_ms:g} ms") if s)
            raise ValueError(f"no submodel fits a budget of {wanted}: the cheapest is {cheapest.submodel.name} at "
                             f"{cheapest.query_mflops:.1f} MFLOPs, the fastest {fastest.submodel.name} at "
                             f"{fastest.latency_ms:.2f} ms (measured on {self.meta.get('machine', 'another machine')})")
        return max(fits, key=lambda p: (p.top1, -p.query_mflops))
