"""Issue 28's "same loss" on the GPU: the issue configuration trained a few hundred joint steps (every level every
step, as `matsearch train` trains) on the clip-art pack's topic labels, once on the fused path (every training
fusion, our Triton kernels) and once on the reference path (the PyTorch backend, every fusion off), from the same
initial weights through the same batches.

    python3 -m benchmarks.gpu.same_loss --pack .data/clipart --out $OUT [--steps 200] [--budget 240]
    python3 -m benchmarks.gpu.same_loss --device cpu --tiny --out /tmp/s     # the script itself, on CPU

bf16 autocast on CUDA: the two paths round differently from the first step, so their curves are compared as
smoothed losses (mean of the last --window steps per level) and as the largest gap between the two smoothed curves;
same_loss.json keeps every step's losses and the summary the table.

`--compare schedules` asks the other question of the issue (a sampling of levels that trains as well as every level
every step): both runs on the fused path, one with `--schedule all`, one with `sampled` (D plus one narrower level a
step, `training.train.step_levels`), for the same number of steps through the same batches, holding out a fixed 20 %
of the labelled images (by key hash, as `matsearch eval --folder` picks its topic queries); the table adds each
level's held-out top-1 and each run's seconds.

    python3 -m benchmarks.gpu.same_loss --compare schedules --pack .data/clipart --out $OUT --steps 400
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
from evaluation.folder_eval import query_rows
from training.cache import open_cache, topic_of, uint8_batch
from training.train import TrainConfig, evaluate_batches, param_groups, train_step
from vision_model.ops.backends import TrainFusions, train_fusions

# name: (backend, fusions off, schedule); the first trains first (within its share of --budget), the second exactly
# as many steps, so the final weights compare too
PATHS = {"reference": ("torch", {name: False for name in TrainFusions.names()}, "all"), "fused": ("auto", {}, "all")}
SCHEDULES = {"all": ("auto", {}, "all"), "sampled": ("auto", {}, "sampled")}
HOLDOUT = 0.2  # --compare schedules: the held-out share of the labelled images


def load_pack(pack: str, cache_dir: str, tiny: bool, holdout: float = 0.0):
    """(images, rows to train on, their labels, held-out rows, their labels, topic names): the clip-art pack's
    labelled images (a `training.cache` cache) with a fixed `holdout` share kept out by key hash; --tiny: random
    28-px images (an array), the last `holdout` share held out."""
    if tiny:
        g = np.random.default_rng(0)
        images, labels = g.integers(0, 256, (64, 1, 28, 28), dtype=np.uint8), g.integers(0, 4, 64)
        held = np.arange(64) >= 64 * (1 - holdout)
        rows = np.arange(64)
        return images, rows[~held], labels[~held], rows[held], labels[held], ["a", "b", "c", "d"]
    from benchmarks.gpu.pack_clipart import unpack
    cache = open_cache(unpack(pack, cache_dir))
    topics = [topic_of(k) for k in cache.keys]
    names = sorted({t for t in topics if t})
    keep = np.array([i for i, t in enumerate(topics) if t])
    labels = np.array([names.index(topics[i]) for i in keep])
    held = query_rows([cache.keys[i] for i in keep], holdout) if holdout else np.zeros(len(keep), bool)
    return cache, keep[~held], labels[~held], keep[held], labels[held], names


def _pixels(images, rows: np.ndarray, device) -> torch.Tensor:
    """uint8 (n, c, s, s) on the device: from a cache or an array."""
    if isinstance(images, np.ndarray):
        return torch.from_numpy(images[rows]).to(device)
    return uint8_batch(images, rows, device)


def run(path: str, args, data, device, steps: int | None = None) -> dict:
    """`steps` steps, or until the path's share of --budget is spent; then each level's top-1 on the held-out
    images, if any."""
    backend, flags, schedule = (SCHEDULES if args.compare == "schedules" else PATHS)[path]
    torch.manual_seed(args.seed)
    spec = TINY_MODEL if args.tiny else ISSUE_MODEL
    n_classes = len(data[-1])
    model = build_encoder(f"{spec}:num_classes={n_classes}", None, device)
    model.ssd_backend = backend
    cfg = model.config
    tc = TrainConfig(levels=(1, 2, 4, 8), lr=args.lr, label_smoothing=0.0, schedule=schedule)
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
            if steps is None and time.time() - t0 > args.budget / 2:
                break
            images, rows_train, labels, *_ = data
            picked = order.integers(0, len(rows_train), args.batch)
            x = _pixels(images, rows_train[picked], device)
            y = torch.from_numpy(labels[picked]).to(device)
            x = (x.float() / 255 - mean) / std
            losses, grad_norm = train_step(model, model, opt, x, y, tc, step, amp,
                                           share_stem=flags.get("shared_stem", True))
            curve.append({str(lv): float(v) for lv, v in losses.items()} | {"grad_norm": float(grad_norm)})
    seconds = time.time() - t0
    images, _, _, rows_held, labels_held, _ = data
    heldout = None
    if len(rows_held):
        with train_fusions(**flags):
            batches = (((_pixels(images, rows_held[i:i + 512], device).float() / 255 - mean) / std,
                        torch.from_numpy(labels_held[i:i + 512])) for i in range(0, len(rows_held), 512))
            heldout = evaluate_batches(model, batches, device, levels=tc.levels, amp_ctx=amp, backend=backend)
    weights = torch.cat([p.detach().float().flatten() for p in model.parameters()]).cpu()
    return {"path": path, "backend": backend, "schedule": schedule, "seconds": seconds, "first_step_s": first_step_s,
            "curve": curve, "weights": weights, "heldout_top1": heldout}


def smoothed(curve: list[dict], level: str, window: int) -> np.ndarray:
    """The level's loss averaged over `window` consecutive steps that ran it (a sampled schedule runs a narrower
    level every third step)."""
    v = np.array([c[level] for c in curve if level in c])
    window = max(1, min(window, len(v)))
    return np.convolve(v, np.ones(window) / window, mode="valid")


def summarize(runs: list[dict], window: int) -> tuple[dict, str]:
    a, b = runs
    steps = len(a["curve"])
    window = min(window, steps)
    levels = sorted({k for c in a["curve"] for k in c if k != "grad_norm"}, key=int)
    held = a["heldout_top1"] is not None and b["heldout_top1"] is not None
    table, lines = {}, [f"| level | {a['path']} (last {window}) | {b['path']} | gap now | largest gap |"
                        + (f" held-out top-1 {a['path']} | {b['path']} |" if held else ""),
                        "|---|---|---|---|---|" + ("---|---|" if held else "")]
    for lv in levels:
        sa, sb = smoothed(a["curve"], lv, window), smoothed(b["curve"], lv, window)
        n = min(len(sa), len(sb))  # a sampled schedule has fewer points at the narrower levels
        first = float(np.mean([c[lv] for c in a["curve"][:window] if lv in c]))
        row = {"first": first, a["path"]: float(sa[-1]), b["path"]: float(sb[-1]),
               "gap_end": float(abs(sa[-1] - sb[-1])),
               "gap_max": max(float(abs(sa[-1] - sb[-1])),
                              float(np.max(np.abs(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(sa)), sa)
                                                  - np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(sb)), sb)))))}
        name = "D" if lv == "1" else f"D/{lv}"
        line = f"| {name} | {row[a['path']]:.4f} | {row[b['path']]:.4f} | {row['gap_end']:.4f} | {row['gap_max']:.4f} |"
        if held:
            row["heldout_top1"] = {r["path"]: r["heldout_top1"][name] for r in runs}
            line += f" {row['heldout_top1'][a['path']]:.1f} | {row['heldout_top1'][b['path']]:.1f} |"
        table[lv] = row
        lines.append(line)
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
    p.add_argument("--compare", choices=("paths", "schedules"), default="paths",
                   help="paths: fused vs PyTorch reference (all levels every step); schedules: all vs sampled "
                        "(fused), with held-out accuracy")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_pack(args.pack, args.cache, args.tiny, HOLDOUT if args.compare == "schedules" else 0.0)
    runs = []
    for path in (SCHEDULES if args.compare == "schedules" else PATHS):
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
