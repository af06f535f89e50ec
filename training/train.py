"""`matsearch train`: jointly train the nested granularities of a MatMamba-Vision encoder.

One optimizer step sees every trained granularity (D, D/2, D/4, D/8):
  --schedule all      each micro-batch is run at every level; the level losses are averaged
  --schedule cycle    the step's micro-batches cycle through the levels, one level each, loss / len(levels)
  --schedule sampled  the whole batch at D plus at one narrower level, taken in turn by step; the narrower loss is
                      weighted (len(levels) - 1) times, so that the expected gradient is the `all` schedule's. Four
                      passes cannot cost less than about 2x one at D: the residual stream, norms and stem are as wide
                      at D/8 as at D (docs/notes/train28.md), while D plus one narrower pass costs about 1.4x.
A step's levels share one stem pass (its activations computed once, its backward run once on the summed
gradient; not under DDP, whose hooks expect whole forward passes).
Recipe: AdamW (decay on 2-D weights only), warm-up + cosine, gradient clipping, label smoothing, drop-path,
bf16 autocast on CUDA; optional self-distillation of the smaller levels towards the full level's soft outputs,
distillation of every level from a convolutional teacher (`--arch resnet` trains one, `--teacher DIR` uses it),
Mixup/CutMix and an EMA of the weights.
Resumable (atomic checkpoints every N steps, with the RNG state), seeded, DDP under torchrun.

Data (`--data`), each behind a "batches of epoch e from batch i on" iterator that the one optimisation loop reads:
  fashion-mnist    the uint8 arrays live on the device; batches are augmented there (random shift, flip, erasing);
                   evaluated on the 10k test split
  imagefolder:DIR  a torchvision ImageFolder tree (labels as ImageFolder assigns them), decoded with Pillow in
                   DataLoader workers as `to_model_input` prepares images, plus a random crop (25-100% of the
                   area, fitted in the config's crop style) and a flip (`data.train_image`); a DistributedSampler
                   shards it under torchrun. Evaluated on --val-data, or on a per-class --val-fraction held out of
                   DIR (by --seed). The model's num_classes and class_names come from the tree. Unreadable images
                   are skipped (replaced by the next readable one), warned about once and listed in result.json.
In both, an epoch's order and every augmentation are functions of (seed, epoch, position), so a resumed run
continues exactly as an uninterrupted one would.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from vision_model.config import get_config
from vision_model.datasets import load_fashion_mnist
from vision_model.device import resolve_device
from vision_model.fileio import atomic_write
from vision_model.hub import save_pretrained, weights_hash
from vision_model.ops.backends import current_fusions
from vision_model.preprocess import to_model_input

from .budget import TimeBudget, warmup_steps
from .data import (IMAGEFOLDER_PREFIX, ImageFolderDataset, collate_skipping, holdout_split, imagefolder_root,
                   sample_seed, scan_imagefolder)
from .teacher import ARCHS, build_network, check_teacher_fits, load_teacher


SCHEDULES = ("all", "cycle", "sampled")


@dataclass
class TrainConfig:
    model: str = "matmamba_vision_fmnist"
    arch: str = "matmamba"  # "resnet": a convolutional distillation teacher on the same data config (one level)
    overrides: dict = field(default_factory=dict)  # config fields, e.g. {"d_inner": 48} for an independent model
    data: str = "fashion-mnist"  # or "imagefolder:DIR"
    val_data: str | None = None  # imagefolder:DIR2 to evaluate on (ImageFolder training); None: hold out val_fraction
    val_fraction: float = 0.1  # of each class of an ImageFolder, held out by `seed` when val_data is None
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))  # DataLoader worker processes
    out: str = "runs/fmnist"
    levels: tuple[int, ...] = (1, 2, 4, 8)
    schedule: str = "all"  # "all" | "cycle" | "sampled"
    distill: float = 0.0  # weight of the KL to the full level's soft outputs (0: off)
    distill_temperature: float = 2.0  # of every soft-target KL (self-distillation and teacher)
    teacher: str | None = None  # model/ folder of a `--arch resnet` run: every pass also matches its soft outputs
    teacher_weight: float = 0.5  # loss = (1 - w) * cross-entropy + w * KL to the teacher
    align: float = 0.0  # weight of 1 - cos(level embedding, full-level embedding): keeps the retrieval space shared
    mnm_samples: int = 0  # extra passes per step at random per-layer widths ("all" schedule), for Mix'n'Match
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
    mix_prob: float = 0.0  # fraction of steps whose batch is mixed by Mixup or CutMix (timm.data.Mixup)
    mixup_alpha: float = 0.8  # Beta(alpha, alpha) mixing weights; 0: CutMix only
    cutmix_alpha: float = 1.0  # 0: Mixup only; both > 0: a mixed batch is either, half the time each
    ema_decay: float = 0.0  # > 0: keep an exponential moving average of the weights, evaluated and saved
    seed: int = 0
    ckpt_every: int = 500
    eval_every: int = 1  # epochs
    device: str = "auto"
    amp: bool = True
    limit: int | None = None  # train on the first N images only (ImageFolder: N seeded picks; smoke tests)
    backend: str = "auto"
    max_minutes: float | None = None  # time budget: the schedule is fitted to it, then stop, evaluate and save
    # (evaluations between epochs are not counted; training/budget.py)
    compile: bool = False  # torch.compile the stem and the blocks' training forward (MatMambaVision.compile_training)
    objective: str = "supervised"  # "self-supervised": a plain folder, no labels (training/ssl.py)
    temperature: float = 0.15  # self-supervised: InfoNCE temperature at D
    local_crops: int = 4  # self-supervised: small views per image (multi-crop)
    feature_nce: float = 0.0  # self-supervised: weight of InfoNCE on D's retrieval vector itself (copy detection)
    cache: str | None = None  # self-supervised: where the folder's decoded cache goes (default OUT/cache)


# -- data ------------------------------------------------------------------------------------------------------

def load_data(tc: TrainConfig):
    """Fashion-MNIST (train images, train labels, test images, test labels), uint8 / int64 on the CPU."""
    if tc.data != "fashion-mnist":
        raise ValueError(f"load_data reads Fashion-MNIST only, not {tc.data!r} (ImageFolder: see ImageFolderBatches)")
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


def _check_steps(n: int, tc: TrainConfig) -> int:
    if n // tc.batch_size == 0:
        raise ValueError(f"{n} training images make no full batch of --batch-size {tc.batch_size}")
    return n // tc.batch_size


class FashionMnistBatches:
    """The fast path: the whole uint8 set on the device, each batch augmented there by `augment`."""
    eval_key = "test_top1"

    def __init__(self, tc: TrainConfig, config, device, rank: int, world: int):
        self.tc, self.config, self.device, self.rank, self.world = tc, config, device, rank, world
        xtr, ytr, self.xte, self.yte = load_data(tc)
        self.x, self.y = xtr.to(device), ytr.to(device)
        self.per_rank = tc.batch_size // world
        self.steps_per_epoch = _check_steps(len(self.x), tc)

    def batches(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Normalised (images, labels) of this rank for steps start.. of `epoch`, on the device."""
        tc, bs, per_rank = self.tc, self.tc.batch_size, self.per_rank
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(tc.seed * 1000 + epoch))
        for i in range(start, self.steps_per_epoch):
            step = epoch * self.steps_per_epoch + i
            idx = perm[i * bs + self.rank * per_rank: i * bs + (self.rank + 1) * per_rank].to(self.device)
            gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step * self.world + self.rank)  # resumable aug
            yield to_model_input(self.config, augment(self.x[idx], gen, erase_prob=tc.erase_prob)), self.y[idx]

    def evaluate(self, model, levels, amp_ctx) -> dict:
        return evaluate(model, self.xte, self.yte, self.config, self.device, levels=levels, amp_ctx=amp_ctx)

    def unreadable(self) -> dict[str, str]:
        return {}

    def restore_unreadable(self, found: dict[str, str]) -> None:
        pass


class EpochBatchSampler(Sampler):
    """One epoch of a rank's batches from batch `start` on, each item keyed (index, augmentation seed).

    The order is the DistributedSampler's (a permutation seeded by its seed + epoch, this rank's share of it), so a
    resumed run that calls set_epoch(epoch, start) sees the batches an uninterrupted run saw from `start` on.
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int, num_batches: int, seed: int):
        self.sampler, self.batch_size, self.num_batches, self.seed = sampler, batch_size, num_batches, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def __iter__(self):
        order = list(self.sampler)
        for b in range(self.start, self.num_batches):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in batch]

    def __len__(self) -> int:
        return self.num_batches - self.start


def imagefolder_samples(tc: TrainConfig):
    """(train samples, val samples, class names) of `tc.data` (+ `tc.val_data` or the held-out fraction)."""
    samples, classes = scan_imagefolder(imagefolder_root(tc.data))
    if tc.val_data:
        if not tc.val_data.startswith(IMAGEFOLDER_PREFIX):
            raise ValueError(f"--val-data must be {IMAGEFOLDER_PREFIX}DIR, got {tc.val_data!r}")
        train, (val, _) = samples, scan_imagefolder(imagefolder_root(tc.val_data), classes)
    else:
        train_idx, val_idx = holdout_split([label for _, label in samples], tc.val_fraction, tc.seed)
        train, val = [samples[i] for i in train_idx], [samples[i] for i in val_idx]
    if tc.limit:  # a seeded subset, in sample order (the first N would be the first classes only)
        keep = lambda items, n: [items[i] for i in sorted(torch.randperm(
            len(items), generator=torch.Generator().manual_seed(tc.seed)).tolist()[:n])]
        train, val = keep(train, tc.limit), keep(val, max(tc.limit // 6, 64))
    return train, val, classes


class ImageFolderBatches:
    """ImageFolder training: decoded and augmented in DataLoader workers, sharded by a DistributedSampler."""
    eval_key = "val_top1"

    def __init__(self, tc: TrainConfig, config, device, rank: int, world: int, train: list, val: list, warn):
        self.tc, self.config, self.device, self.warn = tc, config, device, warn
        self.train_set = ImageFolderDataset(train, config, train=True)
        self.steps_per_epoch = _check_steps(len(train), tc)
        sampler = DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True,
                                     seed=tc.seed * 1000, drop_last=True)
        self.batch_sampler = EpochBatchSampler(sampler, tc.batch_size // world, self.steps_per_epoch, tc.seed)
        workers = dict(num_workers=tc.workers, pin_memory=device.type == "cuda", collate_fn=collate_skipping,
                       generator=torch.Generator())  # its own generator: the global RNG (drop-path) is untouched
        if tc.workers > 0:
            workers.update(prefetch_factor=4)
        self.loader = DataLoader(self.train_set, batch_sampler=self.batch_sampler,
                                 persistent_workers=tc.workers > 0, **workers)
        self.val_loader = None
        if val and _is_main():  # only rank 0 evaluates; its workers start per evaluation
            self.val_loader = DataLoader(ImageFolderDataset(val, config, train=False), batch_size=tc.batch_size,
                                         shuffle=False, **workers)
        self._unreadable: dict[str, str] = {}  # path -> reason, each warned about once

    def _note(self, found) -> None:
        for path, reason in found:
            if path not in self._unreadable:
                self._unreadable[path] = reason
                self.warn(f"warning: skipping unreadable image {path}: {reason}")

    def batches(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        self.batch_sampler.set_epoch(epoch, start)
        for x, y, found in self.loader:
            self._note(found)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _val_batches(self):
        for x, y, found in self.val_loader:
            self._note(found)
            if x is not None:
                yield x, y

    def evaluate(self, model, levels, amp_ctx) -> dict | None:
        if self.val_loader is None:
            return None
        return evaluate_batches(model, self._val_batches(), self.device, levels=levels, amp_ctx=amp_ctx)

    def unreadable(self) -> dict[str, str]:
        return dict(self._unreadable)

    def restore_unreadable(self, found: dict[str, str]) -> None:
        self._unreadable.update(found)


# -- optimisation ----------------------------------------------------------------------------------------------

def param_groups(model, weight_decay: float):
    skip = model.no_weight_decay()
    ndims = getattr(model, "weight_decay_ndims", (2,))  # the encoder: 2-D weights only
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim in ndims and name not in skip else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def mnm_widths(config, tc: TrainConfig, step: int, k: int) -> list[int]:
    """The k-th random Mix'n'Match configuration of a step: each layer at one of the trained widths. Drawn from the
    step number alone, so a resumed run draws the same ones."""
    rng = random.Random(f"{tc.seed}/{step}/{k}")
    return [config.d_model // rng.choice(tc.levels) for _ in range(config.depth)]


def soft_target_kl(logits: Tensor, target_logits: Tensor, temperature: float) -> Tensor:
    """Hinton's distillation term: KL(softmax(target / T) || softmax(logits / T)) * T^2."""
    T = temperature
    return F.kl_div(F.log_softmax(logits.float() / T, -1), F.softmax(target_logits.float() / T, -1),
                    reduction="batchmean") * T * T


def step_levels(tc: TrainConfig, step: int) -> tuple[list[int], dict[int, float]]:
    """The levels one step of `tc.schedule` runs on its whole batch, and the weight of each level's loss."""
    n = len(tc.levels) + tc.mnm_samples
    if tc.schedule != "sampled" or len(tc.levels) == 1:
        return list(tc.levels), {lv: 1.0 / n for lv in tc.levels}
    full, narrower = tc.levels[0], tc.levels[1:]
    picked = narrower[step % len(narrower)]  # in turn: every level equally often, and a resumed run picks the same
    return [full, picked], {full: 1.0 / n, picked: len(narrower) / n}


def level_losses(model, x: Tensor, y: Tensor, tc: TrainConfig, levels, amp_ctx,
                 mnm: Sequence[Sequence[int]] = (), teacher: torch.nn.Module | None = None,
                 weights: dict[int, float] | None = None, share_stem: bool = False) -> dict:
    """Forward+backward at `levels`, then at each Mix'n'Match `mnm` widths, on one micro-batch (gradients
    accumulate); returns each level's loss (and the mean loss of the Mix'n'Match passes under "mnm").
    `weights` scales each level's loss (default 1 / (levels + Mix'n'Match passes) of `tc`). With a `teacher`
    network, every pass is distilled from its soft outputs on the same (augmented) images. With `share_stem` the
    stem runs once: each pass starts from a detached copy of its tokens, and their summed gradient goes through
    the stem's backward once at the end."""
    losses, full_logits, full_emb = {}, None, None
    scale = 1.0 / (len(tc.levels) + tc.mnm_samples)
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad(), amp_ctx:
            teacher_logits = teacher(x).float()
    stem, shared = None, {}
    passes = [(level, dict(level=level)) for level in levels] + [("mnm", dict(widths=list(w))) for w in mnm]
    if share_stem and len(passes) > 1:
        with amp_ctx:
            stem = model.stem_tokens(x)
        shared = dict(tokens=stem.detach().requires_grad_())
    for level, kwargs in passes:
        with amp_ctx:
            logits, emb = model(x, **kwargs, **shared, return_embedding=True)
            # soft targets (Mixup/CutMix) come smoothed already
            smoothing = 0.0 if y.is_floating_point() else tc.label_smoothing
            loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
            if teacher_logits is not None:
                loss = ((1 - tc.teacher_weight) * loss
                        + tc.teacher_weight * soft_target_kl(logits, teacher_logits, tc.distill_temperature))
            if tc.distill > 0 and level != 1 and full_logits is not None:
                loss = loss + tc.distill * soft_target_kl(logits, full_logits, tc.distill_temperature)
            if tc.align > 0 and level != 1 and full_emb is not None:
                loss = loss + tc.align * (1 - F.cosine_similarity(emb.float(), full_emb, dim=-1)).mean()
        if level == 1:
            full_logits, full_emb = logits.detach().float(), emb.detach().float()
        (loss * (scale if weights is None or level == "mnm" else weights[level])).backward()
        if level == "mnm":
            losses["mnm"] = losses.get("mnm", 0.0) + loss.item() / len(mnm)
        else:
            losses[level] = loss.item()
    if stem is not None:
        stem.backward(shared["tokens"].grad)
    return losses


def train_step(train_model, model, opt, xb: Tensor, yb: Tensor, tc: TrainConfig, step: int, amp_ctx,
               teacher: torch.nn.Module | None = None, share_stem: bool = False) -> tuple[dict, float]:
    """One optimisation step of `tc.schedule` on a batch: the level passes (forward + backward), gradient clipping,
    the optimizer step. Returns the level losses and the gradient norm before clipping. `train_model` is `model`
    or its DDP wrapper."""
    if tc.schedule in ("all", "sampled"):
        mnm = [mnm_widths(model.config, tc, step, k) for k in range(tc.mnm_samples)]
        levels, weights = step_levels(tc, step)
        losses = level_losses(train_model, xb, yb, tc, levels, amp_ctx, mnm, teacher, weights, share_stem)
    elif tc.schedule == "cycle":  # micro-batch j runs only level j
        losses = {}
        for xm, ym, lv in zip(xb.chunk(len(tc.levels)), yb.chunk(len(tc.levels)), tc.levels):
            losses.update(level_losses(train_model, xm, ym, tc, [lv], amp_ctx, teacher=teacher))
    else:
        raise ValueError(f"unknown schedule {tc.schedule!r}")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad).item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return losses, grad_norm


@torch.inference_mode()
def evaluate_batches(model, batches: Iterable[tuple[Tensor, Tensor]], device, levels=None, widths_list=None,
                     amp_ctx=nullcontext(), backend="auto") -> dict:
    """Top-1 accuracy (%) over normalised (images, labels) batches, per level (keys 'D/level') and per
    Mix'n'Match widths (keys 'mnm:w1,w2,...')."""
    model.eval()
    settings = [(f"D/{lv}" if lv > 1 else "D", dict(level=lv)) for lv in (levels or [])]
    settings += [("mnm:" + ",".join(map(str, ws)), dict(widths=ws)) for ws in (widths_list or [])]
    correct = {name: 0 for name, _ in settings}
    n = 0
    for xb, yb in batches:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        n += len(yb)
        for name, kw in settings:
            with amp_ctx:
                correct[name] += (model(xb, backend=backend, **kw).argmax(-1) == yb).sum().item()
    return {name: 100.0 * c / max(n, 1) for name, c in correct.items()}


def evaluate(model, x: Tensor, y: Tensor, config, device, levels=None, widths_list=None, batch_size=1000,
             amp_ctx=nullcontext(), backend="auto") -> dict:
    """`evaluate_batches` over uint8 images x (n, c, h, w) and labels y, e.g. the Fashion-MNIST test split."""
    batches = ((to_model_input(config, x[i:i + batch_size].to(device)), y[i:i + batch_size])
               for i in range(0, len(x), batch_size))
    return evaluate_batches(model, batches, device, levels, widths_list, amp_ctx, backend)


# -- checkpoints -----------------------------------------------------------------------------------------------

def save_checkpoint(path: Path, model, opt, step: int, total_steps: int, tc: TrainConfig,
                    unreadable: dict[str, str] | None = None, train_seconds: float = 0.0, ema=None) -> None:
    device = next(model.parameters()).device
    # the global RNG draws the drop-path masks: saved so that a resumed run draws what an uninterrupted one would
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "total_steps": total_steps,
             "train_config": asdict(tc), "class_names": list(model.config.class_names), "rng": rng,
             "unreadable": dict(unreadable or {}), "train_seconds": train_seconds,
             **({"ema": ema.module.state_dict()} if ema is not None else {})}
    atomic_write(path, lambda f: torch.save(state, f))  # a kill mid-write leaves the previous checkpoint intact


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def train(tc: TrainConfig) -> dict:
    if tc.objective == "self-supervised":
        from .ssl import train_ssl
        return train_ssl(tc)
    if tc.objective != "supervised":
        raise ValueError(f"unknown objective {tc.objective!r}: 'supervised' or 'self-supervised'")
    if tc.mnm_samples and tc.schedule == "cycle":
        raise ValueError("--mnm-samples needs --schedule all or sampled (each Mix'n'Match pass runs on the whole "
                         "micro-batch)")
    if tc.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {tc.schedule!r}; choose from {SCHEDULES}")
    if tc.schedule == "sampled" and tc.levels[0] != 1:
        raise ValueError("--schedule sampled runs the first of --levels every step: it must be 1 (D)")
    if tc.arch != "matmamba" and (tuple(tc.levels) != (1,) or tc.mnm_samples or tc.distill or tc.align
                                  or tc.teacher):
        raise ValueError(f"--arch {tc.arch} trains one network of one width: use --levels 1, without "
                         "--mnm-samples, --distill, --align or --teacher")
    if not 0 <= tc.teacher_weight <= 1:
        raise ValueError(f"--teacher-weight must lie in [0, 1], got {tc.teacher_weight}")
    ddp = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        local_rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
    device = resolve_device(tc.device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)

    overrides = dict(tc.overrides)
    if tc.drop_path is not None:
        overrides["drop_path_rate"] = tc.drop_path
    if tc.data.startswith(IMAGEFOLDER_PREFIX):
        train_samples, val_samples, classes = imagefolder_samples(tc)
        overrides.update(num_classes=len(classes), class_names=tuple(classes))  # the tree decides, not --set
    elif tc.data != "fashion-mnist":
        raise ValueError(f"unsupported training data {tc.data!r}: use 'fashion-mnist' or '{IMAGEFOLDER_PREFIX}DIR'")
    elif tc.val_data:
        raise ValueError("--val-data is for ImageFolder training; Fashion-MNIST is evaluated on its test split")
    config = get_config(tc.model, **overrides)
    model = build_network(tc.arch, config, ssd_backend=tc.backend).to(device)
    for lv in tc.levels:
        config.resolve_widths(level=lv)  # fail early on a level this config cannot run
    teacher = None
    if tc.teacher:
        teacher = load_teacher(tc.teacher, device)
        check_teacher_fits(teacher, config, tc.teacher)
    warn = lambda msg: tqdm.write(msg if world == 1 else f"[rank {rank}] {msg}", file=sys.stderr)
    if tc.data.startswith(IMAGEFOLDER_PREFIX):
        data = ImageFolderBatches(tc, config, device, rank, world, train_samples, val_samples, warn)
        if _is_main():
            print(f"{tc.data}: {len(classes)} classes, {len(train_samples)} training and {len(val_samples)} "
                  f"validation images")
    else:
        data = FashionMnistBatches(tc, config, device, rank, world)

    steps_per_epoch = data.steps_per_epoch
    total_steps = steps_per_epoch * tc.epochs
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.999),
                            fused=device.type == "cuda")
    # the EMA ramps up (decay 1 - (1 + step)^(-2/3), capped at ema_decay) so that early weights fade quickly
    ema = ModelEmaV3(model, decay=tc.ema_decay, use_warmup=True) if tc.ema_decay > 0 else None
    final_model = ema.module if ema is not None else model  # evaluated and saved
    if tc.compile and tc.arch == "matmamba":  # after the EMA's copy: that one only runs inference
        model.compile_training()
    mixup = (Mixup(mixup_alpha=tc.mixup_alpha, cutmix_alpha=tc.cutmix_alpha, prob=tc.mix_prob,
                   label_smoothing=tc.label_smoothing, num_classes=config.num_classes) if tc.mix_prob > 0 else None)
    ckpt_path = out / "checkpoint.pt"
    step, planned = 0, False  # planned: total_steps already fitted to --max-minutes
    earlier_seconds = 0.0  # training time of the runs this one resumes
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if "class_names" in state and tuple(state["class_names"]) != tuple(config.class_names):
            raise ValueError(f"{ckpt_path} was trained on classes {state['class_names']}, the data now has "
                             f"{list(config.class_names)}: use a new --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if ema is not None:
            if "ema" not in state:
                raise ValueError(f"{ckpt_path} was trained without --ema-decay: resume it without, or use a new --out")
            ema.module.load_state_dict(state["ema"])
        step = state["step"]
        if "rng" in state:
            torch.set_rng_state(state["rng"]["cpu"].cpu())
            if "cuda" in state["rng"] and device.type == "cuda":
                torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
        total_steps = state.get("total_steps", total_steps)
        earlier_seconds = state.get("train_seconds", 0.0)
        data.restore_unreadable(state.get("unreadable", {}))  # met before the interruption: still reported
        planned = True
        if _is_main():
            print(f"resuming from {ckpt_path} at step {step}/{total_steps}")
    share_stem = not ddp and tc.arch == "matmamba" and current_fusions().shared_stem
    train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
    amp_ctx = torch.autocast("cuda", dtype=torch.bfloat16) if tc.amp and device.type == "cuda" else nullcontext()
    metrics_file = open(out / "metrics.jsonl", "a")
    (out / "train_config.json").write_text(json.dumps(asdict(tc), indent=2))

    budget = TimeBudget(tc.max_minutes, step, planned=planned)  # evaluations are paused out of it

    def on_every_rank(value: int) -> int:
        """Rank 0's value on every rank: the ranks' clocks differ (only rank 0 evaluates), and a plan or a stop that
        one rank makes alone leaves the others waiting at their next all-reduce."""
        if not ddp:
            return value
        t = torch.tensor([int(value)], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(t, 0)
        return int(t.item())

    def out_of_time() -> bool:
        return tc.max_minutes is not None and bool(on_every_rank(budget.out_of_time()))
    first_step = step
    bar = tqdm(total=total_steps, initial=step, disable=not _is_main(), dynamic_ncols=True, mininterval=2)
    t_start, images_seen, wall = time.time(), 0, 0.0
    eval_levels = config.levels if len(tc.levels) > 1 else [1]
    while step < total_steps:
        epoch = step // steps_per_epoch
        batches = data.batches(epoch, step % steps_per_epoch)  # this epoch's batches, from where the run stands
        model.train()
        t0 = time.time()
        for xb, yb in batches:
            warmup = warmup_steps(int(tc.warmup_epochs * steps_per_epoch), total_steps, tc.max_minutes is not None)
            lr = lr_at(step, total_steps, warmup, tc.lr, tc.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            if mixup is not None and len(xb) % 2 == 0:  # (it pairs image i with image b-1-i)
                # timm's Mixup draws from numpy's global RNG: seeded by the step, for resuming
                np.random.seed((tc.seed * 1_000_003 + step * world + rank) % 2 ** 32)
                xb, yb = mixup(xb, yb)
            losses, grad_norm = train_step(train_model, model, opt, xb, yb, tc, step, amp_ctx, teacher, share_stem)
            step += 1
            if ema is not None:
                ema.update(model, step)
            images_seen += len(xb) * world
            wall += time.time() - t0
            if step == first_step + 1:  # the first step compiles and autotunes: the rate is measured after it
                budget.first_step_done(step)
            if budget.due(step):  # the cosine schedule fitted to the time left (training/budget.py)
                total_steps = on_every_rank(budget.fit(step, total_steps, total_steps))
                bar.total = total_steps
                bar.write(f"--max-minutes {tc.max_minutes}: {budget.rate:.2f} steps/s, planning {total_steps} "
                          f"steps ({total_steps / steps_per_epoch:.1f} epochs)")
            if _is_main():
                bar.update(1)
                bar.set_postfix(loss=f"{losses.get(1, next(iter(losses.values()))):.3f}",
                                img_s=f"{images_seen / max(wall, 1e-9):.0f}", lr=f"{lr:.1e}")
                if step % 50 == 0:
                    rec = {"step": step, "epoch": epoch, "lr": lr, "grad_norm": grad_norm,
                           "images_per_s": images_seen / max(wall, 1e-9),
                           **{("loss_mnm" if lv == "mnm" else f"loss_D/{lv}"): v for lv, v in losses.items()}}
                    metrics_file.write(json.dumps(rec) + "\n")
                    metrics_file.flush()
                if step % tc.ckpt_every == 0 or step == total_steps:
                    save_checkpoint(ckpt_path, model, opt, step, total_steps, tc, data.unreadable(),
                                    earlier_seconds + wall, ema)
            if step % steps_per_epoch == 0 or step == total_steps or out_of_time():
                break
            t0 = time.time()
        if out_of_time():
            if _is_main() and step < total_steps:
                bar.write(f"stopping at step {step}/{total_steps}: --max-minutes {tc.max_minutes} reached")
            break
        finished_epoch = step % steps_per_epoch == 0 or step == total_steps
        if _is_main() and finished_epoch and ((epoch + 1) % tc.eval_every == 0 or step == total_steps):
            with budget.pause():
                acc = data.evaluate(final_model, eval_levels, amp_ctx)
                raw = data.evaluate(model, eval_levels, amp_ctx) if acc is not None and ema is not None else None
            if acc is not None:
                rec = {"step": step, "epoch": epoch + 1, data.eval_key: acc, "train_seconds": wall}
                if raw is not None:
                    rec[data.eval_key + "_raw"] = raw
                if isinstance(data, ImageFolderBatches):
                    rec["unreadable_images"] = len(data.unreadable())
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
                bar.write(f"epoch {epoch + 1}: " + "  ".join(f"{k} {v:.2f}%" for k, v in acc.items()))
    bar.close()

    unreadable = data.unreadable()
    if ddp and isinstance(data, ImageFolderBatches):  # every rank met its own share of the bad files
        gathered = [None] * world
        dist.all_gather_object(gathered, unreadable)
        unreadable = {path: reason for found in gathered for path, reason in found.items()}
    result = {}
    if _is_main():
        acc = data.evaluate(final_model, eval_levels, amp_ctx)
        result = {data.eval_key: acc, "train_seconds_this_run": time.time() - t_start,
                  "train_seconds_total": earlier_seconds + wall, "steps": step,
                  "total_steps": total_steps, "epochs_done": step / steps_per_epoch,
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                  "torch": torch.__version__, "world_size": world}
        if ema is not None:
            result[data.eval_key + "_raw"] = data.evaluate(model, eval_levels, amp_ctx)
        if teacher is not None:  # which teacher, exactly, and how good it was on the same evaluation
            result["teacher"] = {"path": str(tc.teacher), "weights_sha256": weights_hash(tc.teacher),
                                 data.eval_key: data.evaluate(teacher, [1], amp_ctx)["D"],
                                 "train_config": teacher.meta.get("train_config", {})}
        if isinstance(data, ImageFolderBatches):
            result["num_classes"] = config.num_classes
            result["unreadable_images"] = [{"path": p, "reason": r} for p, r in sorted(unreadable.items())]
            if unreadable:
                bar.write(f"skipped {len(unreadable)} unreadable image(s) (listed in {out / 'result.json'})",
                          file=sys.stderr)
        save_pretrained(final_model, out / "model", dtype=torch.bfloat16,
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
    p.add_argument("--arch", choices=ARCHS, default=d.arch,
                   help="'resnet': train a convolutional distillation teacher on the config's data (with --levels 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set d_inner=48 (repeatable)")
    p.add_argument("--data", default=d.data,
                   help="'fashion-mnist' (Debian package dataset-fashion-mnist) or 'imagefolder:DIR' (DIR/<class>/"
                        "<image>, labelled as torchvision's ImageFolder; sets the model's num_classes and class_names)")
    p.add_argument("--val-data", default=None, metavar="imagefolder:DIR",
                   help="ImageFolder tree to evaluate on (same class folder names); default: hold out --val-fraction")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="ImageFolder without --val-data: fraction of each class held out for evaluation, by --seed")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="DataLoader worker processes decoding ImageFolder images (0: in the training process)")
    p.add_argument("--out", default=d.out, help="run folder: checkpoint, metrics.jsonl, final model/")
    p.add_argument("--levels", default=",".join(map(str, d.levels)), help="granularities trained jointly")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help="all: every level every step; cycle: one level per micro-batch; sampled: D plus one "
                        "narrower level in turn, weighted to the same expected gradient (see the module docstring)")
    p.add_argument("--distill", type=float, default=d.distill, help="self-distillation weight (0: off)")
    p.add_argument("--distill-temperature", type=float, default=d.distill_temperature,
                   help="softmax temperature of the distillation terms (self and teacher)")
    p.add_argument("--teacher", default=None, metavar="DIR",
                   help="model/ folder of a `--arch resnet` run on the same data: distil every pass from it")
    p.add_argument("--teacher-weight", type=float, default=d.teacher_weight,
                   help="with --teacher: loss = (1 - w) * cross-entropy + w * KL to the teacher's soft outputs")
    p.add_argument("--align", type=float, default=d.align,
                   help="weight of the cosine loss pulling each level's embedding to the full level's (0: off)")
    p.add_argument("--mnm-samples", type=int, default=d.mnm_samples,
                   help="with --schedule all: this many extra passes per step, each at random per-layer widths "
                        "drawn from --levels (trains the Mix'n'Match configurations, not only uniform ones)")
    for name in ("epochs", "batch_size", "ckpt_every", "eval_every", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "min_lr", "weight_decay", "warmup_epochs", "clip_grad", "label_smoothing", "erase_prob"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--mix-prob", type=float, default=d.mix_prob,
                   help="probability that a step's batch is mixed by Mixup or CutMix (0: off)")
    p.add_argument("--mixup-alpha", type=float, default=d.mixup_alpha, help="Mixup's Beta parameter (0: CutMix only)")
    p.add_argument("--cutmix-alpha", type=float, default=d.cutmix_alpha,
                   help="CutMix's Beta parameter (0: Mixup only; both > 0: either, half the time each)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="keep an EMA of the weights with this decay (e.g. 0.998) and evaluate and save it (0: off)")
    p.add_argument("--drop-path", type=float, default=None)
    p.add_argument("--device", default=d.device)
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--limit", type=int, default=None,
                   help="train on the first N images (ImageFolder: N picked by --seed) (smoke tests)")
    p.add_argument("--backend", default=d.backend, choices=["auto", "torch", "triton"])
    p.add_argument("--max-minutes", type=float, default=None,
                   help="a time budget for training: the learning-rate schedule is fitted to end with it, then the "
                        "model is evaluated and saved (evaluations between epochs do not count)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the stem and the blocks' training forward (fuses their elementwise ops; "
                        "compiling takes a while at the start)")
    p.add_argument("--objective", choices=["supervised", "self-supervised"], default=d.objective,
                   help="'self-supervised': --data is a plain folder (recursive; subfolders are not labels), decoded "
                        "once into a cache; multi-crop InfoNCE at D, narrower levels distilled into D's space")
    p.add_argument("--temperature", type=float, default=d.temperature, help="self-supervised InfoNCE temperature")
    p.add_argument("--feature-nce", type=float, default=d.feature_nce,
                   help="self-supervised: weight of an InfoNCE term on D's retrieval vector (pre-head) between the two "
                        "global views; it trains the searched vector itself to match transformed copies")
    p.add_argument("--local-crops", type=int, default=d.local_crops,
                   help="self-supervised: small (img_size/2) views per image besides the two global ones")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="self-supervised: folder for the decoded training cache (default OUT/cache; resumable)")


def _parse_override(item: str):
    key, _, value = item.partition("=")
    if not _:
        raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def run(args) -> int:
    tc = TrainConfig(model=args.model, arch=args.arch, overrides=dict(_parse_override(s) for s in args.overrides),
                     data=args.data, val_data=args.val_data, val_fraction=args.val_fraction, workers=args.workers,
                     out=args.out, levels=tuple(int(v) for v in args.levels.split(",")), schedule=args.schedule,
                     distill=args.distill, distill_temperature=args.distill_temperature, teacher=args.teacher,
                     teacher_weight=args.teacher_weight, align=args.align, mnm_samples=args.mnm_samples,
                     epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                     weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, clip_grad=args.clip_grad,
                     label_smoothing=args.label_smoothing, drop_path=args.drop_path, erase_prob=args.erase_prob,
                     mix_prob=args.mix_prob, mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha,
                     ema_decay=args.ema_decay, seed=args.seed, ckpt_every=args.ckpt_every,
                     eval_every=args.eval_every, device=args.device, amp=args.amp, limit=args.limit,
                     backend=args.backend, max_minutes=args.max_minutes, compile=args.compile,
                     objective=args.objective, temperature=args.temperature, local_crops=args.local_crops,
                     feature_nce=args.feature_nce,
                     cache=args.cache)
    train(tc)
    return 0
