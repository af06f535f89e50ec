"""`matsearch train`: jointly train the nested granularities of a MatMamba-Vision encoder.

One optimizer step sees every trained granularity (D, D/2, D/4, D/8):
  --schedule all    each micro-batch is run at every level; the level losses are averaged
  --schedule cycle  the step's micro-batches cycle through the levels, one level each, loss / len(levels)
Recipe: AdamW (decay on 2-D weights only), warm-up + cosine, gradient clipping, label smoothing, drop-path,
bf16 autocast on CUDA, random-shift/flip/erasing augmentation; optional self-distillation of the smaller levels
towards the full level's soft outputs. Resumable (atomic checkpoints every N steps), seeded, DDP under torchrun.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .config import get_config
from .data import load_fashion_mnist
from .hub import save_pretrained
from .model import MatMambaVision
from .preprocess import normalize_uint8


@dataclass
class TrainConfig:
    model: str = "matmamba_vision_fmnist"
    overrides: dict = field(default_factory=dict)  # config fields, e.g. {"d_inner": 48} for an independent model
    data: str = "fashion-mnist"
    out: str = "runs/fmnist"
    levels: tuple[int, ...] = (1, 2, 4, 8)
    schedule: str = "all"  # "all" | "cycle"
    distill: float = 0.0  # weight of the KL to the full level's soft outputs (0: off)
    distill_temperature: float = 2.0
    align: float = 0.0  # weight of 1 - cos(level embedding, full-level embedding): keeps the retrieval space shared
    epochs: int = 40
    batch_size: int = 256
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    clip_grad: float = 1.0
    label_smoothing: float = 0.1
    drop_path: float | None = None  # None: the model config's
    erase_prob: float = 0.25
    seed: int = 0
    ckpt_every: int = 500
    eval_every: int = 1  # epochs
    device: str = "auto"
    amp: bool = True
    limit: int | None = None  # train on the first N images only (smoke tests)
    backend: str = "auto"
    max_minutes: float | None = None  # wall-clock guard: stop (and still evaluate + save) after this long


# -- data ------------------------------------------------------------------------------------------------------

def load_data(tc: TrainConfig):
    if tc.data != "fashion-mnist":
        raise ValueError(f"unsupported training data {tc.data!r}: use 'fashion-mnist' or 'imagefolder:DIR'"
                         if not tc.data.startswith("imagefolder:") else
                         "ImageFolder training: see `train_imagefolder` (not yet wired to the CLI)")
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    if tc.limit:
        xtr, ytr = xtr[:tc.limit], ytr[:tc.limit]
        xte, yte = xte[:max(tc.limit // 6, 64)], yte[:max(tc.limit // 6, 64)]
    return xtr, ytr, xte, yte


def augment(x: Tensor, gen: torch.Generator, pad: int = 3, erase_prob: float = 0.25) -> Tensor:
    """Random shift (zero-padded crop), horizontal flip and random erasing on a uint8 batch (b, c, h, w)."""
    b, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device="cpu").to(dev)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device="cpu").to(dev)
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, :, None]  # (b, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, :]  # (b, 1, w)
    out = padded[torch.arange(b, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    flip = (torch.rand(b, generator=gen) < 0.5).to(dev)
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if erase_prob > 0:  # one random rectangle (2..h/2 per side) zeroed in a fraction of the images
        eh = torch.randint(2, h // 2 + 1, (b,), generator=gen).to(dev)
        ew = torch.randint(2, w // 2 + 1, (b,), generator=gen).to(dev)
        ey = (torch.rand(b, generator=gen).to(dev) * (h - eh + 1)).long()
        ex = (torch.rand(b, generator=gen).to(dev) * (w - ew + 1)).long()
        on = (torch.rand(b, generator=gen) < erase_prob).to(dev)
        yy = torch.arange(h, device=dev)[None, :, None]
        xx = torch.arange(w, device=dev)[None, None, :]
        mask = ((yy >= ey[:, None, None]) & (yy < (ey + eh)[:, None, None]) &
                (xx >= ex[:, None, None]) & (xx < (ex + ew)[:, None, None]) & on[:, None, None])
        out = out.masked_fill(mask[:, None], 0)
    return out.contiguous()


# -- optimisation ----------------------------------------------------------------------------------------------

def param_groups(model: MatMambaVision, weight_decay: float):
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and name not in skip else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def level_losses(model, x: Tensor, y: Tensor, tc: TrainConfig, levels, amp_ctx) -> dict[int, float]:
    """Forward+backward at `levels` on one micro-batch (gradients accumulate); returns each level's loss."""
    losses, teacher, teacher_emb = {}, None, None
    scale = 1.0 / len(tc.levels)
    for level in levels:
        with amp_ctx:
            logits, emb = model(x, level=level, return_embedding=True)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=tc.label_smoothing)
            if tc.distill > 0 and level != 1 and teacher is not None:
                T = tc.distill_temperature
                kl = F.kl_div(F.log_softmax(logits.float() / T, -1), F.softmax(teacher / T, -1),
                              reduction="batchmean") * T * T
                loss = loss + tc.distill * kl
            if tc.align > 0 and level != 1 and teacher_emb is not None:
                loss = loss + tc.align * (1 - F.cosine_similarity(emb.float(), teacher_emb, dim=-1)).mean()
        if level == 1:
            teacher, teacher_emb = logits.detach().float(), emb.detach().float()
        (loss * scale).backward()
        losses[level] = loss.item()
    return losses


@torch.inference_mode()
def evaluate(model, x: Tensor, y: Tensor, config, device, levels=None, widths_list=None, batch_size=1000,
             amp_ctx=nullcontext(), backend="auto") -> dict:
    """Top-1 accuracy (%) per level (keys 'D/level') and per Mix'n'Match widths (keys 'mnm:w1,w2,...')."""
    model.eval()
    settings = [(f"D/{lv}" if lv > 1 else "D", dict(level=lv)) for lv in (levels or [])]
    settings += [("mnm:" + ",".join(map(str, ws)), dict(widths=ws)) for ws in (widths_list or [])]
    correct = {name: 0 for name, _ in settings}
    for i in range(0, len(x), batch_size):
        xb = normalize_uint8(config, x[i:i + batch_size].to(device))
        yb = y[i:i + batch_size].to(device)
        for name, kw in settings:
            with amp_ctx:
                correct[name] += (model(xb, backend=backend, **kw).argmax(-1) == yb).sum().item()
    return {name: 100.0 * c / len(x) for name, c in correct.items()}


# -- checkpoints -----------------------------------------------------------------------------------------------

def save_checkpoint(path: Path, model, opt, step: int, total_steps: int, tc: TrainConfig) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "total_steps": total_steps,
                "train_config": asdict(tc)}, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def train(tc: TrainConfig) -> dict:
    ddp = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        local_rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
    if tc.device == "auto":
        device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(tc.device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)

    overrides = dict(tc.overrides)
    if tc.drop_path is not None:
        overrides["drop_path_rate"] = tc.drop_path
    config = get_config(tc.model, **overrides)
    model = MatMambaVision(config, ssd_backend=tc.backend).to(device)
    for lv in tc.levels:
        config.resolve_widths(level=lv)  # fail early on a level this config cannot run
    xtr, ytr, xte, yte = load_data(tc)
    xtr, ytr = xtr.to(device), ytr.to(device)

    per_rank = tc.batch_size // world
    steps_per_epoch = len(xtr) // tc.batch_size
    total_steps = steps_per_epoch * tc.epochs
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.999),
                            fused=device.type == "cuda")
    ckpt_path = out / "checkpoint.pt"
    step, planned = 0, False  # planned: total_steps already fitted to --max-minutes
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        total_steps = state.get("total_steps", total_steps)
        planned = True
        if _is_main():
            print(f"resuming from {ckpt_path} at step {step}/{total_steps}")
    train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
    amp_ctx = torch.autocast("cuda", dtype=torch.bfloat16) if tc.amp and device.type == "cuda" else nullcontext()
    metrics_file = open(out / "metrics.jsonl", "a")
    (out / "train_config.json").write_text(json.dumps(asdict(tc), indent=2))

    out_of_time = lambda: tc.max_minutes is not None and time.time() - t_start > 60 * tc.max_minutes
    first_step, t_plan = step, time.time()
    bar = tqdm(total=total_steps, initial=step, disable=not _is_main(), dynamic_ncols=True, mininterval=2)
    t_start, images_seen, wall = time.time(), 0, 0.0
    while step < total_steps:
        epoch = step // steps_per_epoch
        perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(tc.seed * 1000 + epoch))
        model.train()
        for i in range(step % steps_per_epoch, steps_per_epoch):
            t0 = time.time()
            idx = perm[i * tc.batch_size + rank * per_rank: i * tc.batch_size + (rank + 1) * per_rank].to(device)
            gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step * world + rank)  # resumable aug
            xb = normalize_uint8(config, augment(xtr[idx], gen, erase_prob=tc.erase_prob))
            yb = ytr[idx]
            lr = lr_at(step, total_steps, int(tc.warmup_epochs * steps_per_epoch), tc.lr, tc.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            if tc.schedule == "all":
                losses = level_losses(train_model, xb, yb, tc, tc.levels, amp_ctx)
            elif tc.schedule == "cycle":  # micro-batch j runs only level j
                losses = {}
                for xm, ym, lv in zip(xb.chunk(len(tc.levels)), yb.chunk(len(tc.levels)), tc.levels):
                    losses.update(level_losses(train_model, xm, ym, tc, [lv], amp_ctx))
            else:
                raise ValueError(f"unknown schedule {tc.schedule!r}")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            images_seen += len(xb) * world
            wall += time.time() - t0
            if tc.max_minutes is not None and step == first_step + 30 and not planned:
                # fit the cosine schedule to the time budget (still inside warm-up, so nothing has decayed yet)
                rate = 30 / (time.time() - t_plan)
                budget_steps = int(step + rate * (60 * tc.max_minutes * 0.9 - (time.time() - t_start)))
                if budget_steps < total_steps:
                    total_steps = max(budget_steps, step + 1)
                    bar.total = total_steps
                    bar.write(f"--max-minutes {tc.max_minutes}: {rate:.2f} steps/s, planning {total_steps} steps "
                              f"({total_steps / steps_per_epoch:.1f} epochs)")
                planned = True
            if _is_main():
                bar.update(1)
                bar.set_postfix(loss=f"{losses.get(1, next(iter(losses.values()))):.3f}",
                                img_s=f"{images_seen / max(wall, 1e-9):.0f}", lr=f"{lr:.1e}")
                if step % 50 == 0:
                    rec = {"step": step, "epoch": epoch, "lr": lr, "grad_norm": grad_norm,
                           "images_per_s": images_seen / max(wall, 1e-9),
                           **{f"loss_D/{lv}": v for lv, v in losses.items()}}
                    metrics_file.write(json.dumps(rec) + "\n")
                    metrics_file.flush()
                if step % tc.ckpt_every == 0 or step == total_steps:
                    save_checkpoint(ckpt_path, model, opt, step, total_steps, tc)
            if step % steps_per_epoch == 0 or step == total_steps or out_of_time():
                break
        if out_of_time():
            if _is_main():
                bar.write(f"stopping at step {step}/{total_steps}: --max-minutes {tc.max_minutes} reached")
            break
        finished_epoch = step % steps_per_epoch == 0 or step == total_steps
        if _is_main() and finished_epoch and ((epoch + 1) % tc.eval_every == 0 or step == total_steps):
            acc = evaluate(model, xte, yte, config, device, levels=config.levels if len(tc.levels) > 1 else [1],
                           amp_ctx=amp_ctx)
            rec = {"step": step, "epoch": epoch + 1, "test_top1": acc, "train_seconds": wall}
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()
            bar.write(f"epoch {epoch + 1}: " + "  ".join(f"{k} {v:.2f}%" for k, v in acc.items()))
    bar.close()

    result = {}
    if _is_main():
        acc = evaluate(model, xte, yte, config, device, levels=config.levels if len(tc.levels) > 1 else [1],
                       amp_ctx=amp_ctx)
        result = {"test_top1": acc, "train_seconds_this_run": time.time() - t_start, "steps": step,
                  "total_steps": total_steps, "epochs_done": step / steps_per_epoch,
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                  "torch": torch.__version__, "world_size": world}
        save_pretrained(model, out / "model", dtype=torch.bfloat16,
                        extra={"train_config": asdict(tc), "result": result})
        (out / "result.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
    metrics_file.close()
    if ddp:
        dist.destroy_process_group()
    return result


# -- CLI -------------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="config name (see vision_model.CONFIGS)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set d_inner=48 (repeatable)")
    p.add_argument("--data", default=d.data, help="'fashion-mnist' (Debian package dataset-fashion-mnist)")
    p.add_argument("--out", default=d.out, help="run folder: checkpoint, metrics.jsonl, final model/")
    p.add_argument("--levels", default=",".join(map(str, d.levels)), help="granularities trained jointly")
    p.add_argument("--schedule", choices=["all", "cycle"], default=d.schedule)
    p.add_argument("--distill", type=float, default=d.distill, help="self-distillation weight (0: off)")
    p.add_argument("--align", type=float, default=d.align,
                   help="weight of the cosine loss pulling each level's embedding to the full level's (0: off)")
    for name in ("epochs", "batch_size", "ckpt_every", "eval_every", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "min_lr", "weight_decay", "warmup_epochs", "clip_grad", "label_smoothing", "erase_prob"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--drop-path", type=float, default=None)
    p.add_argument("--device", default=d.device)
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--limit", type=int, default=None, help="train on the first N images (smoke tests)")
    p.add_argument("--backend", default=d.backend, choices=["auto", "torch", "triton"])
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this long, then save")


def _parse_override(item: str):
    key, _, value = item.partition("=")
    if not _:
        raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def run(args) -> int:
    tc = TrainConfig(model=args.model, overrides=dict(_parse_override(s) for s in args.overrides), data=args.data,
                     out=args.out, levels=tuple(int(v) for v in args.levels.split(",")), schedule=args.schedule,
                     distill=args.distill, align=args.align, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     min_lr=args.min_lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                     clip_grad=args.clip_grad, label_smoothing=args.label_smoothing, drop_path=args.drop_path,
                     erase_prob=args.erase_prob, seed=args.seed, ckpt_every=args.ckpt_every,
                     eval_every=args.eval_every, device=args.device, amp=args.amp, limit=args.limit,
                     backend=args.backend, max_minutes=args.max_minutes)
    train(tc)
    return 0
