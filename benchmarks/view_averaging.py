"""Multi-view embeddings (test-time augmentation) for 1-NN retrieval, on the database side and the query side.

Does averaging an image's embeddings over flipped and shifted copies lift 1-NN retrieval, on the database side (paid
once, at indexing) or the query side (paid per query)?

    python -m benchmarks.view_averaging [--model DIR] [--db-views 1 flip shift1 shift2] [--query-views 1 flip shift1]
                                        [--levels 1 2 4 8] [--device cuda] [--limit-db N] [--limit-queries N]
                                        [--out DIR]

View sets: `vision_model.views` (each embedding is the normalised sum of the unit embeddings of its views; `1`, `flip`
(2 views), `shift1` (10), `shift2` (18)). `matsearch index build --views` builds a database this way.

Fashion-MNIST: the database is train embedded at D with each --db-views set; queries are test at each --levels level
with each --query-views set. A query costs its level's MFLOPs times its number of views. "held-out" rows query the
last sixth of the database's own images (at D) against the other five sixths: the split to choose a view set on
without looking at the test set. Writes `view_averaging.{json,md}`: 1-NN top-1 and a 10-NN majority vote per row.
Exact neighbours by a chunked matmul, so it also runs where FAISS is absent.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vision_model
from evaluation import metrics
from retrieval import knn
from vision_model.device import resolve_device
from vision_model.views import VIEW_SETS, view

from .accuracy_resolution import add_study_arguments, database_and_queries, device_name, embed, nearest


def embed_each_view(model, images: torch.Tensor, level: int, views, device: torch.device) -> dict[tuple, torch.Tensor]:
    """Unit embeddings (n, d) float32 on the device of every view of every image."""
    return {v: embed(model, view(images, *v), model.config.img_size, level, device)[0] for v in views}


def averaged(per_view: dict[tuple, torch.Tensor], view_set: str) -> torch.Tensor:
    return F.normalize(sum(per_view[v] for v in VIEW_SETS[view_set]), dim=-1)


def score(queries: torch.Tensor, query_labels, database: torch.Tensor, db_labels, classes: int) -> dict:
    ids = nearest(queries, database, 10).cpu().numpy()
    labels = knn.labels_of(db_labels, ids)
    votes = F.one_hot(torch.as_tensor(labels), classes).sum(1).argmax(1).numpy()
    return {"top1": 100 * metrics.top1_accuracy(labels, query_labels),
            "vote10_top1": 100 * float((votes == query_labels).mean())}


def measure(model_dir: Path | None, db_sets: list[str], query_sets: list[str], levels: list[int] | None,
            device: torch.device, limit_db: int | None, limit_queries: int | None, log=print) -> list[dict]:
    model = vision_model.load_model(model_dir, device=device).eval()
    cfg = model.config
    unknown = sorted(set(db_sets + query_sets) - set(VIEW_SETS))
    if unknown:
        raise ValueError(f"unknown view sets {unknown}; choose from {list(VIEW_SETS)}")
    levels = levels or list(cfg.levels)
    if limit_db is not None and limit_db < 60:
        raise ValueError(f"--limit-db {limit_db}: at least 60 database images are needed (10 neighbours per query)")
    db_images, db_labels, q_images, q_labels = database_and_queries(limit_db, limit_queries)
    needed = list(dict.fromkeys(v for s in db_sets + query_sets for v in VIEW_SETS[s]))
    db_views = embed_each_view(model, db_images, 1, needed, device)
    split = len(db_labels) - len(db_labels) // 6
    records = []

    def add(kind: str, level: int, db_set: str, query_set: str, result: dict, queries: int, database: int):
        views = len(VIEW_SETS[query_set])
        record = {"queries_from": kind, "level": level, "setting": "D" if level == 1 else f"D/{level}",
                  "db_views": db_set, "query_views": query_set, **result,
                  "query_mflops": views * vision_model.submodel_cost(cfg, level=level).mflops,
                  "queries": queries, "database": database}
        records.append(record)
        log(f"  {kind:<8} {record['setting']:<4} db {db_set:<6} query {query_set:<6} top-1 {record['top1']:6.2f}  "
            f"10-NN vote {record['vote10_top1']:6.2f}  {record['query_mflops']:7.1f} MFLOPs")

    for db_set in db_sets:
        database = averaged(db_views, db_set)
        for query_set in query_sets:
            queries = averaged(db_views, query_set)[split:]
            add("held-out", 1, db_set, query_set, score(queries, db_labels[split:], database[:split],
                                                        db_labels[:split], cfg.num_classes),
                len(db_labels) - split, split)
    for level in levels:
        q_views = embed_each_view(model, q_images, level, needed, device)
        for db_set in db_sets:
            database = averaged(db_views, db_set)
            for query_set in query_sets:
                add("test", level, db_set, query_set,
                    score(averaged(q_views, query_set), q_labels, database, db_labels, cfg.num_classes),
                    len(q_labels), len(db_labels))
    return records


def markdown(records: list[dict], title: str) -> str:
    lines = [title, "", "| queries | level | database views | query views | 1-NN top-1 | 10-NN vote top-1 | "
             "query MFLOPs |", "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['queries_from']} | {r['setting']} | {r['db_views']} ({len(VIEW_SETS[r['db_views']])}) | "
                     f"{r['query_views']} ({len(VIEW_SETS[r['query_views']])}) | {r['top1']:.2f} | "
                     f"{r['vote10_top1']:.2f} | {r['query_mflops']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db-views", nargs="+", default=["1", "flip", "shift1", "shift2"])
    p.add_argument("--query-views", nargs="+", default=["1", "flip", "shift1"])
    add_study_arguments(p, "runs/view_averaging")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    records = measure(args.model, args.db_views, args.query_views, args.levels, device, args.limit_db,
                      args.limit_queries)
    seconds = time.perf_counter() - t0
    machine = device_name(device)
    title = (f"**{args.model or 'shipped model'}: {records[-1]['queries']} test queries, {records[-1]['database']} "
             f"train images embedded at D ({machine}, fp32, {seconds:.0f} s)**")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "view_averaging.json").write_text(json.dumps({"title": title, "records": records}, indent=1) + "\n")
    (args.out / "view_averaging.md").write_text(markdown(records, title))
    print(f"wrote {args.out}/view_averaging.{{json,md}} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
