"""Why 1-NN retrieval trails the classifier: which database images give the nearest-neighbour label away.

    python -m evaluation.knn_gap [--model DIR] [--limit-db N] [--limit-queries N] [--json OUT]

Database: Fashion-MNIST train embedded at D (unit vectors, exact inner product); queries: the test images at D.
Per query it compares the classifier's prediction with the label of the nearest database image. For the queries the
classifier gets right and 1-NN gets wrong, it asks whether that neighbour is a "disputed" image: one whose stored
label the model's own classifier disagrees with (an ambiguous or mislabelled training image the model did not fit).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.datasets import fashion_mnist_rows
from retrieval.knn import InMemoryDatabase
from vision_model import load_model


@torch.inference_mode()
def embed_and_classify(model, split: str, limit: int | None, batch_size: int = 500):
    """Unit D embeddings, the classifier's predictions and the labels of the first `limit` images of a split."""
    pixels, labels = fashion_mnist_rows(model, split, slice(limit))
    embs, preds = [], []
    for start in range(0, len(pixels), batch_size):
        emb = model.embed(pixels[start:start + batch_size])
        embs.append(F.normalize(emb, dim=-1))
        preds.append(model.head(emb).argmax(-1))
    return torch.cat(embs).numpy(), torch.cat(preds).numpy(), labels


def knn_gap(model, limit_db: int | None = None, limit_queries: int | None = None, k: int = 10) -> dict:
    db_vecs, db_pred, db_labels = embed_and_classify(model, "train", limit_db)
    q_vecs, q_pred, q_labels = embed_and_classify(model, "test", limit_queries)
    _, ids = InMemoryDatabase(db_vecs, db_labels).search(q_vecs, k)
    nearest = ids[:, 0]
    clf_right, nn_right = q_pred == q_labels, db_labels[nearest] == q_labels
    disputed = db_pred != db_labels  # database images the classifier labels otherwise
    lost = clf_right & ~nn_right
    votes = np.array([np.bincount(db_labels[row], minlength=model.config.num_classes).argmax() for row in ids])
    pct = lambda mask: round(100 * float(np.mean(mask)), 2) if np.size(mask) else None
    return {
        "database": len(db_labels), "queries": len(q_labels),
        "classifier_top1": pct(clf_right),
        "nn1_top1": pct(nn_right),
        f"nn{k}_majority_top1": pct(votes == q_labels),
        "classifier_right_nn1_wrong": pct(lost),
        "classifier_wrong_nn1_right": pct(~clf_right & nn_right),
        "disputed_database_images": pct(disputed),
        "disputed_among_misleading_neighbours": pct(disputed[nearest[lost]]),
        "nn1_top1_without_disputed_neighbours": pct(nn_right[~disputed[nearest]]),
        "queries_whose_neighbour_is_disputed": pct(disputed[nearest]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="saved model folder (default: the shipped model)")
    p.add_argument("--limit-db", type=int, default=None)
    p.add_argument("--limit-queries", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    result = {"model": args.model or "shipped", **knn_gap(load_model(args.model).eval(), args.limit_db,
                                                          args.limit_queries)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
