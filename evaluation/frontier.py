"""Budget -> submodel: the accuracy/cost Pareto frontier of Mix'n'Match width configurations, and a picker.

With trained widths d_model/{1,2,4,8} per layer there are 4^depth submodels (65,536 for depth 8), too many to
measure. The search measures a bounded number of them on a held-out split and keeps the frontier:

1. seeds: the trained levels (uniform widths) and every two-block config (first half of the layers at one
   width, second half at another), 16 configs for four widths;
2. refinement: neighbours of current frontier points (one layer moved one width step up or down), sampled
   at random in rounds, until `max_evaluations` configs have been measured.

Each config is measured for 1-NN top-1 accuracy and recall@10 of the full-model neighbours on held-out queries
against a full-model database (by default 1,000 Fashion-MNIST *train* images against 10,000 other train images;
never the test set), query MFLOPs (cost model) and batch-1 latency (encode + search, on this machine). The
frontier (lowest MFLOPs for each accuracy; with 1,000 queries, top-1 differences under about 1% are noise) is written atomically to `<model_dir>/pareto.json` with the model's
weights hash, for the UI and CLI to reuse:

    python -m evaluation.frontier --model DIR           # compute and store the frontier
    Frontier.load(DIR).select(budget_mflops=80)      # the most accurate frontier submodel within 80 MFLOPs
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import vision_model
from retrieval import knn
from retrieval.budget import Frontier, FrontierPoint, pareto_front
from retrieval.encoder import QueryEncoder
from retrieval.submodel import Submodel

from . import metrics
from .datasets import encode_database, fashion_mnist_rows



# -- the search space ------------------------------------------------------------------------------------------------
def width_choices(config) -> list[int]:
    """The trained widths, widest first: d_model / level for each trained level."""
    return [config.d_model // level for level in config.levels]


def seed_configs(config) -> list[tuple[int, ...]]:
    """The trained levels, then every two-block config (first half at one width, second half at another)."""
    choices, depth = width_choices(config), config.depth
    half = depth // 2
    seeds = [(w,) * depth for w in choices]
    seeds += [(a,) * half + (b,) * (depth - half) for a in choices for b in choices if a != b]
    return list(dict.fromkeys(seeds))


def neighbours(widths: tuple[int, ...], choices: list[int]) -> list[tuple[int, ...]]:
    """Configs one layer away, moved one width step up or down."""
    out = []
    for layer, width in enumerate(widths):
        step = choices.index(width)
        for other in (step - 1, step + 1):
            if 0 <= other < len(choices):
                out.append(widths[:layer] + (choices[other],) + widths[layer + 1:])
    return out


def search_frontier(evaluate: Callable[[Submodel], FrontierPoint], config, max_evaluations: int = 40,
                    per_round: int = 8, seed: int = 0,
                    progress: Callable[[str], None] | None = None) -> list[FrontierPoint]:
    """Measure seed configs, then neighbours of the frontier, up to `max_evaluations` configs; all measured."""
    if max_evaluations < 1:
        raise ValueError(f"max_evaluations must be >= 1, got {max_evaluations}")
    rng = np.random.default_rng(seed)
    choices = width_choices(config)
    measured: dict[tuple[int, ...], FrontierPoint] = {}

    def measure(widths: tuple[int, ...]) -> None:
        measured[widths] = point = evaluate(Submodel(widths=widths).canonical(config))
        if progress:
            progress(f"[{len(measured)}/{max_evaluations}] {point.submodel.name}: top-1 {point.top1:.4f}, "
                     f"{point.query_mflops:.1f} MFLOPs, {point.latency_ms:.2f} ms")

    for widths in seed_configs(config)[:max_evaluations]:
        measure(widths)
    while len(measured) < max_evaluations:
        front = pareto_front(measured.values())
        children = list(dict.fromkeys(child for point in front for child in neighbours(point.submodel.resolve(config),
                                                                                        choices)
                                      if child not in measured))
        if not children:
            break
        take = min(len(children), per_round, max_evaluations - len(measured))
        for i in rng.choice(len(children), size=take, replace=False):
            measure(children[i])
    return list(measured.values())


# -- measuring one config ------------------------------------------------------------------------------------------
class HeldOutEvaluator:
    """Measures submodels on held-out query images against a full-model database of other images."""

    def __init__(self, encoder: QueryEncoder, query_pixels: torch.Tensor, query_labels: np.ndarray,
                 database: knn.VectorDatabase, latency_queries: int = 20):
        self.encoder, self.pixels, self.labels, self.database = encoder, query_pixels, query_labels, database
        self.latency_rows = range(min(latency_queries, len(query_pixels)))
        _, self.reference_ids = database.search(encoder.embed(query_pixels, Submodel(level=1)), 10)

    def __call__(self, submodel: Submodel) -> FrontierPoint:
        _, ids = self.database.search(self.encoder.embed(self.pixels, submodel), 10)
        top1 = metrics.top1_accuracy(knn.labels_of(self.database, ids), self.labels)

        def one_query(row: int) -> None:
            self.database.search(self.encoder.embed(self.pixels[row:row + 1], submodel), 10)

        latency = float(np.median(metrics.latencies_ms(one_query, self.latency_rows)))  # same work every query
        return FrontierPoint(submodel, top1, metrics.recall_at_k(ids, self.reference_ids, 10),
                             submodel.mflops(self.encoder.config), latency)


def compute_frontier(model, query_pixels: torch.Tensor, query_labels: np.ndarray, db_pixels: torch.Tensor,
                     db_labels: np.ndarray, max_evaluations: int = 40, latency_queries: int = 20,
                     batch_size: int = 256, seed: int = 0,
                     progress: Callable[[str], None] | None = None) -> Frontier:
    encoder = QueryEncoder(model, batch_size=batch_size)
    evaluator = HeldOutEvaluator(encoder, query_pixels, query_labels, encode_database(encoder, db_pixels, db_labels),
                                 latency_queries)
    evaluated = search_frontier(evaluator, model.config, max_evaluations, seed=seed, progress=progress)
    source_dir = getattr(model, "source_dir", None)  # set by from_pretrained: the weights the frontier is for
    meta = {"model_name": model.config.name,
            "weights_sha256": vision_model.weights_hash(source_dir) if source_dir is not None else None,
            "queries": len(query_pixels),
            "database": len(db_pixels), "max_evaluations": max_evaluations, "latency_queries": latency_queries,
            "machine": f"{torch.device(encoder.device)} with {torch.get_num_threads()} torch threads",
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    return Frontier(pareto_front(evaluated), sorted(evaluated, key=lambda p: p.query_mflops), meta)


def build_frontier(model_dir: str | Path | None = None, n_queries: int = 1000, n_database: int = 10_000,
                   max_evaluations: int = 40, latency_queries: int = 20, batch_size: int = 256, seed: int = 0,
                   device: str = "cpu", progress: Callable[[str], None] | None = None) -> Frontier:
    """Compute the frontier on Fashion-MNIST train (queries: the first n_queries images, database: the next
    n_database) and store it in `<model_dir>/pareto.json`."""
    model_dir = Path(model_dir) if model_dir is not None else vision_model.DEFAULT_MODEL_DIR
    model = vision_model.load_model(model_dir, device=device)
    query_pixels, query_labels = fashion_mnist_rows(model, "train", slice(0, n_queries))
    db_pixels, db_labels = fashion_mnist_rows(model, "train", slice(n_queries, n_queries + n_database))
    if len(query_pixels) < n_queries or len(db_pixels) < 1:
        raise ValueError(f"Fashion-MNIST train has too few images for {n_queries} queries + {n_database} database")
    frontier = compute_frontier(model, query_pixels, query_labels, db_pixels, db_labels, max_evaluations,
                                latency_queries, batch_size, seed, progress)
    frontier.meta.update(model_dir=str(model_dir.resolve()),
                         split={"queries": f"fashion-mnist:train[0:{n_queries}]",
                                "database": f"fashion-mnist:train[{n_queries}:{n_queries + len(db_pixels)}]"})
    frontier.save(model_dir)
    return frontier


# -- command line: python -m evaluation.frontier --------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", help="saved model folder (default: the shipped model)")
    parser.add_argument("--queries", type=int, default=1000, help="held-out train queries (default 1000)")
    parser.add_argument("--database", type=int, default=10_000, help="train images in the database (default 10000)")
    parser.add_argument("--max-evaluations", type=int, default=40, help="configs to measure (default 40)")
    parser.add_argument("--latency-queries", type=int, default=20, help="batch-1 queries timed per config")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    frontier = build_frontier(args.model, args.queries, args.database, args.max_evaluations, args.latency_queries,
                              args.batch_size, args.seed, args.device, progress=print)
    print(f"\nfrontier ({len(frontier.points)} of {len(frontier.evaluated)} measured), "
          f"stored in {Frontier.path(args.model or vision_model.DEFAULT_MODEL_DIR)}:")
    for p in frontier.points:
        print(f"  {p.query_mflops:8.1f} MFLOPs  {p.latency_ms:7.2f} ms  top-1 {p.top1:.4f}  {p.submodel.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.frontier", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
