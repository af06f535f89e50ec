"""Issue 28's "same loss" on the GPU: the issue configuration trained a few hundred joint steps (every level every
step, as `matsearch train` trains) on the clip-art pack's topic labels, once on the fused path (every training
fusion, our Triton kernels) and once on the reference path (the PyTorch backend, every fusion off), from the same
initial weights through the same batches.

    python3 -m benchmarks.gpu.same_loss --pack .data/clipart --out $OUT [--steps 200] [--budget 240]
    python3 -m benchmarks.gpu.same_loss --device cpu --tiny --out /tmp/s     # the script itself, on CPU

bf16 autocast on CUDA: the two paths round differently from the first step, so their curves are compared as
smoothed losses (mean of the last --window steps per level) and as the largest gap between the two smoothed curves;
same_loss.json keeps every step's losses and the summary the table.
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from benchmarks.measure import environment
from benchmarks.train_speed import ISSUE_MODEL, TINY_MODEL, build_encoder
from training.cache import open_cache, topic_of, uint8_batch
from training.train import TrainConfig, param_groups, train_step
from vision_model.ops.backends import TrainFusions, train_fusions

# the reference first: the fused path then trains exactly as many steps, so the final weights compare too
PATHS = {"reference": ("torch", {name: False for name in TrainFusions.names()}), "fused": ("auto", {})}


def load_pack(pack: str, cache_dir: str, tiny: bool):
    """(uint8 images (n, 3, s, s), topic labels, topic names) from the clip-art pack; --tiny: random images."""
    if tiny:
        g = np.random.default_rng(0)
        return g.integers(0, 256, (64, 1, 28, 28), dtype=np.uint8), g.integers(0, 4, 64), ["a", "b", "c", "d"]
    from benchmarks.gpu.pack_clipart import unpack
    cache = open_cache(unpack(pack, cache_dir))
    topics = [topic_of(k) for k in cache.keys]
    names = sorted({t for t in topics if t})
    keep = np.array([i for i, t in enumerate(topics) if t])
    labels = np.array([names.index(topics[i]) for i in keep])
    return cache, keep, labels, names


def run(path: str, args, data, device, steps: int | None = None) -> dict:
    """`steps` steps, or until the path's share of --budget is spent."""
    backend, flags = PATHS[path]
    torch.manual_seed(args.seed)
    spec = TINY_MODEL if args.tiny else ISSUE_MODEL
    n_classes = len(data[-1])
    model = build_encoder(f"{spec}:num_classes={n_classes}", None, device)
    model.ssd_backend = backend
    cfg = model.config
    tc = TrainConfig(levels=(1, 2, 4, 8), lr=args.lr, label_smoothing=0.0)
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=args.lr, fused=device.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    mean = torch.tensor(cfg.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, device=device).view(1, -1, 1, 1)
    order = np.random.default_rng(args.seed)
    curve, t0, first_step_s = [], time.time(), None
    with train_fusions(**flags):
        for step in range(args.steps if steps is None else steps):
            if step == 1:
                first_step_s, t0 = time.time() - t0, time.time()  # compiling is not training: off the budget
            if steps is None and time.time() - t0 > args.budget / len(PATHS):
                break
            if args.tiny:
                images, labels, _ = data
                rows = order.integers(0, len(labels), args.batch)
                x = torch.from_numpy(images[rows]).to(device)
            else:
                cache, keep, labels, _ = data
                rows = order.integers(0, len(keep), args.batch)
                x = uint8_batch(cache, keep[rows], device)
            y = torch.from_numpy(labels[rows]).to(device)
            x = (x.float() / 255 - mean) / std
            losses, grad_norm = train_step(model, model, opt, x, y, tc, step, amp,
                                           share_stem=flags.get("shared_stem", True))
            curve.append({str(lv): float(v) for lv, v in losses.items()} | {"grad_norm": float(grad_norm)})
    weights = torch.cat([p.detach().float().flatten() for p in model.parameters()]).cpu()
    return {"path": path, "backend": backend, "seconds": time.time() - t0, "first_step_s": first_step_s,
            "curve": curve, "weights": weights}


def smoothed(curve: list[dict], level: str, window: int) -> np.ndarray:
    v = np.array([c[level] for c in curve])
    return np.convolve(v, np.ones(window) / window, mode="valid")


def summarize(runs: list[dict], window: int) -> tuple[dict, str]:
    a, b = runs
    steps = len(a["curve"])
    window = min(window, steps)
    levels = [k for k in a["curve"][0] if k != "grad_norm"]
    table, lines = {}, [f"| level | {a['path']} (last {window}) | {b['path']} | gap now | largest gap |",
                        "|---|---|---|---|---|"]
    for lv in levels:
        sa, sb = smoothed(a["curve"], lv, window), smoothed(b["curve"], lv, window)
        first = float(np.mean([c[lv] for c in a["curve"][:window]]))
        row = {"first": first, a["path"]: float(sa[-1]), b["path"]: float(sb[-1]),
               "gap_end": float(abs(sa[-1] - sb[-1])), "gap_max": float(np.max(np.abs(sa - sb)))}
        table[lv] = row
        name = "D" if lv == "1" else f"D/{lv}"
        lines.append(f"| {name} | {row[a['path']]:.4f} | {row[b['path']]:.4f} | {row['gap_end']:.4f} | "
                     f"{row['gap_max']:.4f} |")
    wa, wb = a["weights"], b["weights"]
    rel = float((wa - wb).norm() / wb.norm())
    lines += ["", f"{steps} steps each; final weights: relative difference {rel:.2e}; "
                  f"{a['path']} {a['seconds']:.0f} s after a first step of {a['first_step_s'] or 0:.0f} s, "
                  f"{b['path']} {b['seconds']:.0f} s after {b['first_step_s'] or 0:.0f} s"]
    return {"steps_compared": steps, "levels": table, "weights_rel_diff": rel}, "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pack", default=".data/clipart")
    p.add_argument("--cache", default="/tmp/clipart_cache")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--window", type=int, default=20, help="steps per smoothed loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=1e9, help="seconds of training for both paths together")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="the two-layer model on random 28-px images: the script on CPU")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_pack(args.pack, args.cache, args.tiny)
    runs = []
    for path in PATHS:
        runs.append(run(path, args, data, device, len(runs[0]["curve"]) if runs else None))
        print(f"{path}: {runs[-1]['seconds']:.0f} s, last losses {runs[-1]['curve'][-1]}", flush=True)
    result, text = summarize(runs, args.window)
    out = {"environment": environment(device), "args": {k: str(v) for k, v in vars(args).items()}, **result,
           "curves": {r["path"]: r["curve"] for r in runs}}
    (args.out / "same_loss.json").write_text(json.dumps(out, indent=1))
    (args.out / "same_loss.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
