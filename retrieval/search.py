"""`Searcher`: an index plus the model that built it, queried at any granularity. What the UI and CLI call.

    searcher = Searcher("indexes/fashion-mnist-train")
    results = searcher.search([pil_image], submodel="D/4", k=10)
    results = searcher.search([pil_image], cascade=Funnel(small="D/8", large="D", shortlist=100), k=10)
    results = searcher.search([pil_image], cascade=Adaptive(small="D/8", large="D", margin=0.02), k=10)
    results = searcher.search([pil_image], cascade=Adaptive("D/8", "D", gate="vote", vote=0.6), k=10)
    results[0].ids, results[0].scores, results[0].metadata, results[0].timings, results[0].mflops

Timings per query are the batch's stage times shared equally by the queries that took part in a stage (an
escalated query also carries its share of the second encode), so for a single query they are simply its times.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

import vision_model
from index import IndexStore

from .cascade import Cascade, cascade_search
from .encoder import Queries, QueryEncoder
from .staged import StagedResult, StageTimer, plain_search
from .submodel import Submodel, trained_levels


class ModelMismatchError(ValueError):
    """The model given is not the one whose embeddings the index holds."""


@dataclass
class QueryResult:
    ids: np.ndarray  # (<= k,) int64, best first
    scores: np.ndarray  # (<= k,) float32 cosine similarities, descending
    metadata: list[dict]  # one row per id: id, key, label, label_name, sha256, width, height, source
    timings: dict[str, float]  # ms: decode, encode, search, rerank
    mflops: float  # query-encoder MFLOPs this query actually spent
    submodels: list[str] = field(default_factory=list)  # names of the submodels this query was encoded with
    escalated: bool = False  # funnel: reranked; adaptive: re-searched with the large submodel

    @property
    def labels(self) -> list[str | None]:
        return [row["label_name"] for row in self.metadata]

    def to_dict(self) -> dict:
        return {"ids": self.ids.tolist(), "scores": [round(float(s), 6) for s in self.scores],
                "metadata": self.metadata, "timings": {k: round(v, 3) for k, v in self.timings.items()},
                "mflops": round(self.mflops, 3), "submodels": self.submodels, "escalated": self.escalated}


class Searcher:
    def __init__(self, index_dir: str | Path, model_dir: str | Path | None = None, device: str = "cpu",
                 batch_size: int = 64):
        self.store = IndexStore.open(index_dir, device=device)
        try:
            self.model_dir = self._matching_model_dir(model_dir)
            self.model = vision_model.from_pretrained(self.model_dir, device=device)
        except BaseException:
            self.store.close()
            raise
        self.encoder = QueryEncoder(self.model, batch_size=batch_size)
        self._frontier = None

    def _matching_model_dir(self, model_dir: str | Path | None) -> Path:
        index_sha, index_model = self.store.weights_sha256, self.store.model_dir
        if model_dir is None:  # the index's own model
            if not (index_model / vision_model.hub.WEIGHTS_FILE).is_file():
                raise FileNotFoundError(
                    f"the index {self.store.directory} was built with the model in {index_model} (weights sha256 "
                    f"{index_sha[:16]}…), which is not there any more: pass the folder of that model")
            model_dir = index_model
        model_dir = Path(model_dir)
        model_sha = vision_model.weights_hash(model_dir)
        if model_sha != index_sha:
            raise ModelMismatchError(
                f"model {model_dir} (weights sha256 {model_sha[:16]}…) is not the model the index "
                f"{self.store.directory} was built with: {index_model} (weights sha256 {index_sha[:16]}…). "
                "Embeddings of different models live in different spaces: use the index's model, or build an "
                "index with this one")
        return model_dir

    # -- facts for a UI --------------------------------------------------------------------------------------------
    @property
    def config(self) -> vision_model.MatMambaVisionConfig:
        return self.model.config

    def submodels(self) -> list[Submodel]:
        """The trained levels: D, D/2, D/4, D/8."""
        return trained_levels(self.config)

    def mflops(self, submodel: Submodel | int | str | Sequence[int] | None = None) -> float:
        return Submodel.coerce(submodel).mflops(self.config)

    def frontier(self):
        """The model's budget frontier (pareto.json beside the model), or None if it was never computed."""
        from .budget import Frontier

        if self._frontier is None and Frontier.exists(self.model_dir):
            self._frontier = Frontier.load(self.model_dir)
        return self._frontier

    def submodel_for_budget(self, budget_mflops: float | None = None, budget_ms: float | None = None) -> Submodel:
        """The most accurate frontier submodel within the budget; ValueError if none fits or no frontier."""
        from .budget import Frontier

        frontier = self.frontier() or Frontier.load(self.model_dir)  # raises a clear error when missing
        return frontier.select(budget_mflops=budget_mflops, budget_ms=budget_ms).submodel

    # -- search ----------------------------------------------------------------------------------------------------
    def search(self, images: Queries, submodel: Submodel | int | str | Sequence[int] | None = None, k: int = 10,
               cascade: Cascade | None = None, label_filter: Iterable[int | str] | None = None,
               score_threshold: float | None = None) -> list[QueryResult]:
        """Search the index with each query image; one QueryResult per query, in order.

        submodel: plain search at this granularity (Submodel, level 1/2/4/8, "D/4", widths; None: the full model).
        cascade: a two-stage search instead, funnel or adaptive (`retrieval.cascade`; it names its own submodels).
        label_filter: only items with these labels (ids or names). score_threshold: drop results scoring below it.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        timer = StageTimer()
        with timer("decode"):
            pixels = self.encoder.to_pixels(images)
        n = len(pixels)
        allowed = self._allowed_ids(label_filter)

        def embed(sub: Submodel, rows: np.ndarray) -> np.ndarray:
            with timer("encode", rows):
                return self.encoder.embed(pixels[rows], sub)

        if cascade is not None:
            staged = cascade_search(self.store, embed, n, cascade, k, self.config, timer, allowed)
        else:
            staged = plain_search(self.store, embed, n, Submodel.coerce(submodel), k, self.config, timer, allowed)
        return self._results(staged, timer.per_query(n), score_threshold)

    def _allowed_ids(self, label_filter: Iterable[int | str] | None) -> np.ndarray | None:
        if label_filter is None:
            return None
        names = self.store.label_names
        wanted = set()
        for label in label_filter:
            if isinstance(label, str) and not label.lstrip("-").isdigit():
                if label not in names:
                    raise ValueError(f"unknown label {label!r}; this index has {names or 'no label names'}")
                wanted.add(names.index(label))
            else:
                wanted.add(int(label))
        return np.flatnonzero(np.isin(self.store.labels, sorted(wanted)))

    def _results(self, staged: StagedResult, timings: list[dict[str, float]],
                 score_threshold: float | None) -> list[QueryResult]:
        results = []
        for i, timing in enumerate(timings):
            keep = staged.ids[i] >= 0
            if score_threshold is not None:
                keep &= staged.scores[i] >= score_threshold
            ids = staged.ids[i][keep]
            used = staged.submodels if staged.escalated[i] else staged.submodels[:1]
            results.append(QueryResult(ids, staged.scores[i][keep], self.store.metadata(ids), timing,
                                       float(staged.mflops[i]), [s.name for s in used], bool(staged.escalated[i])))
        return results

    # -- lifetime --------------------------------------------------------------------------------------------------
    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
