"""Query time: encoding with nested submodels, search, funnel / adaptive cascades and budget selection.

    from retrieval import Searcher, Submodel, Funnel, Adaptive
    searcher = Searcher("indexes/fashion-mnist-train")          # the index and the model that built it
    results = searcher.search(pil_images, Submodel(level=4), k=10)
    results = searcher.search(pil_images, k=10, cascade=Funnel(small="D/8", large="D", shortlist=100))
    results = searcher.search(pil_images, k=10, cascade=Adaptive(small="D/8", large="D", gate="vote", vote=0.6))
    results = searcher.search(pil_images, k=10, cascade=Funnel("D/8", "D", 100, rerank_when="vote", vote=0.6))
    sub = searcher.submodel_for_budget(budget_mflops=80)        # from <model_dir>/pareto.json

Names are imported on first use, so that `matsearch --help` does not import torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Searcher": "search", "QueryResult": "search", "ModelMismatchError": "search",
    "Submodel": "submodel", "QueryEncoder": "encoder", "EncodedQueries": "encoder", "UnreadableQuery": "encoder",
    "Cascade": "cascade", "Funnel": "cascade", "Adaptive": "cascade", "Gate": "gate", "calibrate_margin": "gate",
    "calibrate_vote": "gate", "held_out_margins": "gate", "held_out_votes": "gate",
    "Frontier": "budget", "FrontierPoint": "budget",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
