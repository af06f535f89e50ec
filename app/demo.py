"""`matsearch demo`: the whole story on a fresh machine, in a few minutes on a laptop CPU.

1. load the shipped model (or --model);
2. index Fashion-MNIST train with the full model into indexes/fashion-mnist-train (the first 10,000 images by
   default, all 60,000 with --full; an index already there is reused or extended);
3. search a few test images at D, D/2, D/4 and D/8 (the same index for all), showing cost, latency and labels;
4. 1-NN accuracy of each granularity (and of a D/8 -> D funnel) on 500 test queries.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DEFAULT_INDEX_DIR = Path("indexes/fashion-mnist-train")
SOURCE = "fashion-mnist:train"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--limit", type=int, default=10_000, metavar="N",
                      help="index the first N train images (default 10000: about a minute on 2 CPU cores)")
    size.add_argument("--full", action="store_true", help="index all 60,000 train images")
    parser.add_argument("--index", default=str(DEFAULT_INDEX_DIR), metavar="DIR",
                        help=f"index folder (default {DEFAULT_INDEX_DIR})")
    parser.add_argument("--model", metavar="DIR", help="saved model folder (default: the shipped model)")
    parser.add_argument("--examples", type=int, default=3, help="test images to show (default 3)")
    parser.add_argument("--k", type=int, default=5, help="results shown per example (default 5)")
    parser.add_argument("--queries", type=int, default=500, help="test queries for 1-NN accuracy (default 500)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def ensure_index(index_dir: Path, model_dir: Path, limit: int | None, device: str) -> str:
    """Reuse the index if it was built from Fashion-MNIST train by this model and is big enough; extend it if
    it is too small; build it otherwise. Returns what was done, in words."""
    from index import build_index
    from index.store import current_version, read_manifest
    from vision_model import weights_hash

    version = current_version(index_dir) if index_dir.is_dir() else None
    manifest = read_manifest(version) if version is not None else None
    same_model = manifest is not None and manifest["weights_sha256"] == weights_hash(model_dir)
    usable = same_model and manifest["sources"] == [SOURCE]
    wanted = limit if limit is not None else 60_000
    if usable and manifest["count"] >= wanted:
        return f"reusing {index_dir} ({manifest['count']} images)"
    started = time.perf_counter()
    result = build_index(SOURCE, index_dir, model_dir=model_dir, limit=limit, device=device, add=usable)
    verb = "extended" if usable else "built"
    return f"{verb} {index_dir}: {result.manifest['count']} images in {time.perf_counter() - started:.0f} s"


def run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    import vision_model
    from vision_model.config import FASHION_MNIST_CLASSES

    from evaluation.datasets import fashion_mnist
    from retrieval.cascade import Funnel
    from retrieval.search import Searcher
    from retrieval.submodel import trained_levels

    model_dir = Path(args.model) if args.model else vision_model.DEFAULT_MODEL_DIR
    vision_model.load_model(model_dir)  # a clear error now if the weights are missing
    print(f"model: {model_dir}")
    print(ensure_index(Path(args.index), model_dir, None if args.full else args.limit, args.device))

    searcher = Searcher(args.index, model_dir, device=args.device)
    levels = trained_levels(searcher.config)
    test_images, test_labels = fashion_mnist("test")

    print(f"\n{args.examples} test images, searched at every granularity (top {args.k} labels; latency: encode + "
          "search at batch 1, best of 3):")
    for row in range(args.examples):
        truth = FASHION_MNIST_CLASSES[test_labels[row]]
        print(f"\ntest image {row} ({truth})")
        image = Image.fromarray(test_images[row, 0].numpy())  # through the model's own preprocessing, like a file
        for sub in levels:
            # best of 3: the first call at a width slices its weights, and other processes add noise
            latency, result = min(((r.timings["encode"] + r.timings["search"], r) for r in
                                   (searcher.search([image], sub, k=args.k)[0] for _ in range(3))),
                                  key=lambda pair: pair[0])
            matches = sum(label == truth for label in result.labels)
            print(f"  {sub.name:<4} {result.mflops:7.1f} MFLOPs  {latency:6.1f} ms  {matches}/{len(result.labels)} "
                  f"match  {', '.join(result.labels)}")

    n = min(args.queries, len(test_labels))
    queries, truth = test_images[:n], test_labels[:n]
    print(f"\n1-NN accuracy on {n} test queries against {len(searcher.store)} train images:")
    modes = [(sub.name, {"submodel": sub}) for sub in levels]
    funnel = Funnel(levels[-1], levels[0], shortlist=100)
    modes.append((funnel.name, {"cascade": funnel}))
    for name, mode in modes:
        started = time.perf_counter()
        results = searcher.search(queries, k=1, **mode)
        ms = (time.perf_counter() - started) * 1e3 / n
        accuracy = np.mean([len(r.ids) > 0 and r.metadata[0]["label"] == t for r, t in zip(results, truth)])
        print(f"  {name:<24} {results[0].mflops:7.1f} MFLOPs  top-1 {accuracy:.3f}  {ms:5.2f} ms/query batched")
    print(f"\n(torch on {args.device} with {torch.get_num_threads()} threads)")
    searcher.close()
    return 0
