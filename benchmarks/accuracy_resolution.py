"""Retrieval accuracy of a Fashion-MNIST model vs input resolution and level, with cost: one trade-off plot.

    python -m benchmarks.accuracy_resolution --out runs/acc_res [--resolutions 28 40 56 84 112] [--device cuda]

At each resolution the test and train images are resized (bilinear) from 28 px, the database (train) is embedded by
the full model and the queries (test) by each trained level; the metric is the 1-NN top-1 of `matsearch eval`
(label of the nearest database image by cosine similarity) plus recall@10 of the full model's neighbours at the same
resolution.  Cost: analytic MFLOPs per query (the cost model) and measured query images/s on the device.
The nearest neighbours are exact (a chunked matmul + top-k in torch), so the script also runs where FAISS is absent.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vision_model
from vision_model.datasets import load_fashion_mnist
from vision_model.device import resolve_device
from evaluation import metrics  # numpy only: no FAISS needed
from retrieval import knn  # labels_of: numpy only as well
from vision_model.preprocess import to_model_input

from .measure import synchronize
from .report import plt


def _resized_input(model, images: torch.Tensor, resolution: int) -> torch.Tensor:
    x = to_model_input(model.config, images)
    return x if resolution == x.shape[-1] else F.interpolate(x, size=(resolution, resolution), mode="bilinear",
                                                             align_corners=False)


@torch.inference_mode()
def embed(model, images: torch.Tensor, resolution: int, level: int, device: torch.device,
          batch_size: int = 1024) -> tuple[torch.Tensor, float]:
    """Unit embeddings (n, d) float32 on the device, and the images/s of the model calls (synchronised)."""
    out, model_s = [], 0.0
    model.embed(_resized_input(model, images[:batch_size], resolution).to(device), level=level)  # warm-up: autotune
    for start in range(0, len(images), batch_size):
        x = _resized_input(model, images[start:start + batch_size], resolution).to(device)
        synchronize(device)
        t0 = time.perf_counter()
        e = model.embed(x, level=level)
        synchronize(device)
        model_s += time.perf_counter() - t0
        out.append(F.normalize(e.float(), dim=-1))
    return torch.cat(out), len(images) / model_s


def nearest(queries: torch.Tensor, database: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Exact top-k database ids by inner product, (n, k)."""
    return torch.cat([(q @ database.T).topk(k, dim=1).indices for q in queries.split(chunk)])


def database_and_queries(limit_db: int | None, limit_queries: int | None):
    """Fashion-MNIST uint8 images and numpy labels: the first `limit_db` train images (the database) and the first
    `limit_queries` test images (the queries), as (db_images, db_labels, q_images, q_labels)."""
    db_images, db_labels = load_fashion_mnist("train")
    q_images, q_labels = load_fashion_mnist("test")
    return (db_images[:limit_db], db_labels[:limit_db].numpy(), q_images[:limit_queries],
            q_labels[:limit_queries].numpy())


def add_study_arguments(p: argparse.ArgumentParser, out: str) -> None:
    """The options every Fashion-MNIST retrieval study here takes: model, levels, device, subsets, output folder."""
    p.add_argument("--model", type=Path, help="Fashion-MNIST model folder (default: the shipped model)")
    p.add_argument("--levels", type=int, nargs="+", help="trained levels (default: all of the model's)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--limit-db", type=int, help="first N train images as the database")
    p.add_argument("--limit-queries", type=int, help="first N test images as queries")
    p.add_argument("--out", type=Path, default=Path(out))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def measure(model_dir: Path | None, resolutions: list[int], levels: list[int] | None, device: torch.device,
            limit_db: int | None, limit_queries: int | None, log=print) -> list[dict]:
    model = vision_model.load_model(model_dir, device=device).eval()
    cfg = model.config
    bad = [res for res in resolutions if res % cfg.patch_size]
    if bad:
        raise ValueError(f"resolutions {bad} are not multiples of the model's patch size {cfg.patch_size}")
    levels = levels or list(cfg.levels)
    db_images, db_labels, q_images, q_labels = database_and_queries(limit_db, limit_queries)
    records = []
    for res in resolutions:
        database, _ = embed(model, db_images, res, 1, device)
        reference = None
        for level in levels:
            queries, images_per_s = embed(model, q_images, res, level, device)
            ids = nearest(queries, database, 10).cpu().numpy()
            if reference is None:
                reference = ids
            recall = metrics.recall_at_k(ids, reference, 10)
            record = {"resolution": res, "level": level, "setting": "D" if level == 1 else f"D/{level}",
                      "top1": 100 * metrics.top1_accuracy(knn.labels_of(db_labels, ids), q_labels),
                      "recall@10": recall,
                      "query_mflops": vision_model.submodel_cost(cfg, level=level, img_size=res).mflops,
                      "query_images_per_s": images_per_s, "queries": len(q_labels), "database": len(db_labels)}
            records.append(record)
            log(f"  {res:>4} px {record['setting']:<4} top-1 {record['top1']:6.2f}  R@10 {recall:.3f}  "
                f"{record['query_mflops']:8.1f} MFLOPs  {images_per_s:9.0f} img/s")
    return records


def markdown(records: list[dict], title: str) -> str:
    lines = [title, "", "| resolution | level | top-1 | recall@10 vs D | query MFLOPs | query images/s |",
             "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['resolution']} | {r['setting']} | {r['top1']:.2f} | {r['recall@10']:.3f} | "
                     f"{r['query_mflops']:.1f} | {r['query_images_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for res in sorted({r["resolution"] for r in records}):
        rows = sorted((r for r in records if r["resolution"] == res), key=lambda r: r["query_mflops"])
        for ax, key in zip(axes, ("query_mflops", "query_images_per_s")):
            ax.plot([r[key] for r in rows], [r["top1"] for r in rows], "o-", label=f"{res} px")
            for r in rows:
                ax.annotate(r["setting"], (r[key], r["top1"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    axes[0].set_xlabel("query MFLOPs (cost model)")
    axes[1].set_xlabel("query images/s (measured)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_ylabel("1-NN top-1 (%)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy_resolution", description=__doc__.splitlines()[0])
    p.add_argument("--resolutions", type=int, nargs="+", default=[28, 40, 56, 84, 112])
    add_study_arguments(p, "runs/accuracy_resolution")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    started = time.perf_counter()
    records = measure(args.model, args.resolutions, args.levels, device, args.limit_db, args.limit_queries)
    args.out.mkdir(parents=True, exist_ok=True)
    name = (args.model or vision_model.DEFAULT_MODEL_DIR).name
    where = device_name(device)
    title = (f"{name}: {records[0]['queries']} test queries, {records[0]['database']} train images embedded at D, "
             f"both resized to each resolution ({where}, fp32)")
    (args.out / "accuracy_resolution.json").write_text(json.dumps({"title": title, "records": records}, indent=1))
    (args.out / "accuracy_resolution.md").write_text(markdown(records, f"**{title}**"))
    plot(records, args.out / "accuracy_resolution.png", title)
    print(f"wrote {args.out}/accuracy_resolution.{{json,md,png}} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
