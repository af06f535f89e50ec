"""`matsearch eval --folder DIR`: retrieval quality on a folder of images whose top-level subfolders are topics.

    matsearch eval --folder /usr/share/openclipart/png --model DIR --unlabelled-topic unsorted \
        --json eval.json --markdown eval.md --plot eval.png

The folder is decoded once into a cache at the model's resolution (training/cache.py; --folder may name a built
cache). Every encoder is measured on the same images in the same run:
  topic retrieval   the topic folder is the label (only here: training never reads it). Database: every labelled
                    image, embedded at D; queries: a fixed --query-fraction of them (chosen by a hash of the key,
                    so the same for every model, and held out from a supervised reference's training data),
                    embedded at D, D/2, D/4 and D/8. Leave-one-out (a query's own database entry is removed).
                    1-NN accuracy and mAP@10 (evaluation/metrics.py).
  copy detection    --copies images of the collection are cropped (a random box of half the area), flipped,
                    brightened (x1.5) or recompressed as JPEG (quality 30), each from the cached picture and fitted
                    back to the model's size; the copy, queried at each level, must find its original (top-1) among
                    the whole collection embedded at D.
Encoders (--compare, repeatable, NAME=SPEC or SPEC): 'pixels' (the image at 32x32, centred and L2-normalised),
'random' (--model's architecture, randomly initialised, seed 0), 'shipped' (the default Fashion-MNIST model, its
own preprocessing), a shipped model's name, or a model folder (e.g. a supervised reference).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageEnhance

import vision_model
from retrieval.encoder import QueryEncoder
from retrieval.knn import InMemoryDatabase, labels_of
from retrieval.submodel import Submodel
from training.cache import build_cache, is_cache, open_cache, topic_of
from vision_model.preprocess import fit_to_size

from . import metrics

TRANSFORMS = ("crop", "flip", "brightness", "jpeg")
PIXELS_SIDE = 32
DEFAULT_COMPARE = ("pixels", "random", "shipped")


def copy_of(image: np.ndarray, transform: str, rng: np.random.Generator, size: int, crop: str) -> np.ndarray:
    """A transformed copy of a (3, s, s) uint8 image, fitted back to size x size."""
    img = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    if transform == "crop":
        side = np.sqrt(0.5)
        w, h = round(img.width * side), round(img.height * side)
        left, top = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
        img = img.crop((left, top, left + w, top + h))
    elif transform == "flip":
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif transform == "brightness":
        img = ImageEnhance.Brightness(img).enhance(1.5)
    elif transform == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=30)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    else:
        raise ValueError(f"unknown transform {transform!r}")
    return fit_to_size(TF.pil_to_tensor(img), size, crop).numpy()


class Encoder:
    """uint8 (n, 3, s, s) images -> unit embeddings at a level; `levels` are what it can be queried at."""

    def __init__(self, name: str, kind: str, embed: Callable[[np.ndarray, int], np.ndarray], levels, source: str):
        self.name, self.kind, self.embed, self.levels, self.source = name, kind, embed, tuple(levels), source


def _pixels_encoder() -> Encoder:
    def embed(images: np.ndarray, level: int) -> np.ndarray:
        x = F.interpolate(torch.from_numpy(np.asarray(images)).float() / 255, size=PIXELS_SIDE, mode="area")
        x = x.flatten(1)
        return F.normalize(x - x.mean(1, keepdim=True), dim=-1).numpy()
    return Encoder("raw pixels", "pixels", embed, (1,), f"{PIXELS_SIDE}x{PIXELS_SIDE} RGB, centred")


def _model_encoder(name: str, kind: str, model, source: str, batch_size: int) -> Encoder:
    encoder = QueryEncoder(model, batch_size=batch_size)
    cfg = model.config

    def embed(images: np.ndarray, level: int) -> np.ndarray:
        images = np.asarray(images)
        if images.shape[1:] == (cfg.in_chans, cfg.img_size, cfg.img_size):
            pixels = encoder.to_pixels(torch.from_numpy(np.ascontiguousarray(images)))
        else:  # another input format (e.g. 28x28 grey): the model's own preprocessing of the picture
            pixels = model.preprocess([Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0))) for a in images])
        return encoder.embed(pixels, Submodel(level=level))
    return Encoder(name, kind, embed, cfg.levels, source)


def load_encoders(model_spec: str | None, compare: list[str], device: str, batch_size: int) -> list[Encoder]:
    """The evaluated model first, then the comparisons (see the module docstring)."""
    main = vision_model.load_model(model_spec, device=device)
    folder = Path(str(model_spec or "shipped"))
    name = "/".join(folder.parts[-2:]) if folder.name == "model" else folder.name  # train runs save to RUN/model
    out = [_model_encoder(name, "model", main, str(model_spec), batch_size)]
    for item in compare:
        name, _, spec = item.rpartition("=")
        if spec == "pixels":
            enc = _pixels_encoder()
        elif spec == "random":
            torch.manual_seed(0)
            model = vision_model.MatMambaVision(main.config).to(device).eval()
            enc = _model_encoder(f"{main.config.name}, random init", "random", model, "seed 0", batch_size)
        else:
            model = vision_model.load_model(None if spec == "shipped" else spec, device=device)
            label = "shipped Fashion-MNIST model" if spec == "shipped" else Path(spec).name
            enc = _model_encoder(label, "model", model, str(model.source_dir), batch_size)
        enc.name = name or enc.name
        out.append(enc)
    return out


def _level_name(level: int) -> str:
    return "D" if level == 1 else f"D/{level}"


def query_rows(keys: list[str], fraction: float) -> np.ndarray:
    """Whether each key is a topic query: a fixed fraction chosen by a hash of the key (model-independent)."""
    h = np.array([int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) for k in keys])
    return h < fraction * 16 ** 8


def topic_labels(keys: list[str], unlabelled: tuple[str, ...] = ()) -> tuple[np.ndarray, list[str]]:
    topics = [topic_of(k) for k in keys]
    names = sorted({t for t in topics if t is not None and t not in unlabelled})
    index = {t: i for i, t in enumerate(names)}
    return np.array([index.get(t, -1) for t in topics], dtype=np.int64), names


def evaluate_folder(cache, encoders: list[Encoder], query_fraction: float = 0.2, copies: int = 500,
                    unlabelled: tuple[str, ...] = (), seed: int = 0, crop: str = "pad",
                    log: Callable[[str], None] = print) -> dict:
    images = np.asarray(cache.images)
    labels, topic_names = topic_labels(cache.keys, unlabelled)
    labelled = np.flatnonzero(labels >= 0)
    queries = labelled[query_rows([cache.keys[i] for i in labelled], query_fraction)]
    if len(topic_names) < 2 or len(queries) == 0:
        raise ValueError(f"topic retrieval needs images in at least two topic subfolders and some queries: "
                         f"{len(topic_names)} topics, {len(queries)} queries")
    rng = np.random.default_rng(seed)
    originals = np.sort(rng.choice(len(images), size=min(copies, len(images)), replace=False))
    copy_images = {t: np.stack([copy_of(images[i], t, rng, cache.size, crop) for i in originals]) for t in TRANSFORMS}
    n_relevant = metrics.relevant_counts(labels[labelled], labels[queries]) - 1  # minus the query itself
    records = []
    for enc in encoders:
        t0 = time.perf_counter()
        db_all = enc.embed(images, 1)
        topic_db = InMemoryDatabase(db_all[labelled], labels[labelled])
        full_db = InMemoryDatabase(db_all)
        own = np.searchsorted(labelled, queries)  # each query's row in topic_db
        for level in enc.levels:
            q = db_all[queries] if level == 1 else enc.embed(images[queries], level)
            _, ids = topic_db.search(q, 11)
            ids = np.array([[i for i in row if i != me][:10] for row, me in zip(ids, own)])
            got = labels_of(topic_db, ids)
            rec = {"encoder": enc.name, "kind": enc.kind, "source": enc.source, "level": _level_name(level),
                   "topic_top1": metrics.top1_accuracy(got, labels[queries]),
                   "topic_map@10": metrics.map_at_k(got, labels[queries], 10, n_relevant)}
            for t in TRANSFORMS:
                _, top = full_db.search(enc.embed(copy_images[t], level), 1)
                rec[f"copy_{t}"] = float(np.mean(top[:, 0] == originals))
            records.append(rec)
            log(f"  {enc.name:<40} {rec['level']:<4} topic 1-NN {rec['topic_top1']:.3f} mAP@10 "
                f"{rec['topic_map@10']:.3f}  copy " + " ".join(f"{t} {rec['copy_' + t]:.3f}" for t in TRANSFORMS))
        log(f"  ({enc.name}: {time.perf_counter() - t0:.0f} s)")
    return {"records": records, "images": len(images), "topics": topic_names, "labelled": len(labelled),
            "topic_queries": len(queries), "copy_queries": len(originals), "query_fraction": query_fraction,
            "unlabelled_topics": list(unlabelled), "skipped": len(cache.skipped),
            "duplicates": len(cache.duplicates), "source": cache.source or str(cache.directory), "size": cache.size}


# -- report ----------------------------------------------------------------------------------------------------------
def markdown(result: dict, title: str = "") -> str:
    lines = [f"# {title or 'Folder retrieval evaluation'}", "",
             f"{result['images']} distinct images of {result['source']} at {result['size']} px "
             f"({result['skipped']} unreadable files skipped, {result['duplicates']} duplicates dropped); "
             f"{len(result['topics'])} topics, {result['labelled']} labelled images as the topic database (at D), "
             f"{result['topic_queries']} held-out topic queries (leave-one-out); {result['copy_queries']} copy "
             "queries per transform against the whole collection at D.", "",
             "| encoder | query level | topic 1-NN (%) | topic mAP@10 (%) | "
             + " | ".join(f"copy {t} (%)" for t in TRANSFORMS) + " |", "|---" * (4 + len(TRANSFORMS)) + "|"]
    for r in result["records"]:
        lines.append(f"| {r['encoder']} | {r['level']} | {100 * r['topic_top1']:.1f} | {100 * r['topic_map@10']:.1f} | "
                     + " | ".join(f"{100 * r['copy_' + t]:.1f}" for t in TRANSFORMS) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = result["records"]
    encoders = list(dict.fromkeys(r["encoder"] for r in records))
    levels = list(dict.fromkeys(r["level"] for r in records))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    width = 0.8 / len(levels)
    for j, level in enumerate(levels):
        vals = [next((100 * r["topic_top1"] for r in records if r["encoder"] == e and r["level"] == level), np.nan)
                for e in encoders]
        ax1.bar(np.arange(len(encoders)) + j * width, vals, width, label=f"query at {level}")
    ax1.set_xticks(np.arange(len(encoders)) + 0.4 - width / 2, encoders, rotation=20, ha="right", fontsize=8)
    ax1.set_ylabel("topic 1-NN (%), database at D")
    ax1.legend(fontsize=8)
    ax1.grid(axis="y", alpha=0.3)
    shown = [(e, lv) for e in encoders for lv in ("D", "D/8") if any(r["encoder"] == e and r["level"] == lv
                                                                    for r in records)]
    width = 0.8 / len(shown)
    for j, (e, lv) in enumerate(shown):
        r = next(r for r in records if r["encoder"] == e and r["level"] == lv)
        ax2.bar(np.arange(len(TRANSFORMS)) + j * width, [100 * r["copy_" + t] for t in TRANSFORMS], width,
                label=f"{e} @ {lv}")
    ax2.set_xticks(np.arange(len(TRANSFORMS)) + 0.4 - width / 2, TRANSFORMS)
    ax2.set_ylabel("copy detection top-1 (%), database at D")
    ax2.legend(fontsize=7)
    ax2.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "Folder retrieval", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line (a mode of `matsearch eval`) -------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("folder mode (--folder)")
    g.add_argument("--folder", metavar="DIR", help="evaluate on this folder of images (top-level subfolders = "
                                                   "topics) or a training cache of one, instead of Fashion-MNIST")
    g.add_argument("--compare", action="append", default=None, metavar="[NAME=]SPEC",
                   help="baseline encoders: pixels, random, shipped, a shipped name or a model folder (repeatable; "
                        f"default {', '.join(DEFAULT_COMPARE)})")
    g.add_argument("--cache", metavar="DIR", help="where the folder is decoded (default: beside --json)")
    g.add_argument("--query-fraction", type=float, default=0.2, help="topic queries: this fraction of the images")
    g.add_argument("--copies", type=int, default=500, help="copy-detection originals (each copied 4 ways)")
    g.add_argument("--unlabelled-topic", action="append", default=[], metavar="NAME",
                   help="a top-level folder that is no topic (e.g. unsorted): in the copy database only")
    g.add_argument("--title", default="", help="report title")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    encoders = load_encoders(args.model, list(DEFAULT_COMPARE if args.compare is None else args.compare),
                             args.device, args.batch_size)
    cfg = vision_model.load_model(args.model).config
    if is_cache(args.folder):
        cache = open_cache(args.folder)
    else:
        cache_dir = Path(args.cache) if args.cache else Path(args.json).parent / f".folder-cache-{cfg.img_size}"
        cache = build_cache(args.folder, cache_dir, cfg.img_size, cfg.crop, limit=args.limit_db)
    result = evaluate_folder(cache, encoders, args.query_fraction, args.copies, tuple(args.unlabelled_topic),
                             crop=cfg.crop)
    for out in (args.json, args.markdown, args.plot):
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    outputs = [args.json]
    if args.markdown:
        Path(args.markdown).write_text(markdown(result, args.title))
        outputs.append(args.markdown)
    if args.plot:
        plot(result, args.plot, args.title)
        outputs.append(args.plot)
    print(f"wrote {', '.join(map(str, outputs))} ({time.perf_counter() - started:.0f} s)")
    return 0
