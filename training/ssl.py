"""Self-supervised training of a nested encoder on a plain folder: `matsearch train --objective self-supervised`.

Objective (docs/notes/ssl22.md says why): multi-crop InfoNCE at D, and every narrower level distilled into D's
embedding space.
  D      SimCLR/MoCo-v3-style InfoNCE through a projection head (MLP, dropped after training): each of the two global
         views (img_size) and of the --local-crops small views (img_size / 2) must pick its own image's other
         global view(s) among the batch's, at temperature --temperature. Both sides
         carry gradients (SimCLR), so D learns invariance to crop, flip, colour, blur and recompression.
         Plus --feature-nce x the same InfoNCE between the two global views on the retrieval vector itself (pre-head,
         as SSCD trains its copy-detection descriptor), so what is searched is what was made invariant.
  D/l    on the backbone embedding itself (the retrieval vector, pre-head), with D's embeddings as fixed targets
         (stop-gradient): InfoNCE from each global view at D/l to the *other* view at D (the copy-detection query:
         a transformed copy searched at D/l in a database built at D) plus 1 - cos to the *same* view at D (so the
         D/l neighbours are D's). The narrow levels are students in D's space; they never pull D towards themselves.
One optimizer step sees every level; loss = (L_D + sum of L_D/l) / number of levels.

Data: the folder is decoded once into a training cache (training/cache.py; `--data` may also name a built cache
folder), batches are read from its memory map and augmented on the device (training/augment.py). Labels are never
read: a folder with class subfolders is just images. Resumable (checkpoint.pt every --ckpt-every steps and at the
end, RNG included: a step's batch and views are functions of the seed and step), bf16 autocast on CUDA, a tqdm bar,
metrics.jsonl, --max-minutes fits the cosine schedule to a time budget. The saved model/ folder is the encoder only.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from timm.utils import ModelEmaV3
from tqdm import tqdm

from vision_model.config import get_config
from vision_model.hub import save_pretrained
from vision_model.model import MatMambaVision

from .augment import ViewSpec, augment
from .budget import TimeBudget, warmup_steps
from .cache import build_cache, is_cache, open_cache, uint8_batch

PROJ_HIDDEN, PROJ_DIM = 1024, 128
LOCAL_SCALE = (0.08, 0.3)  # small views: a part of the picture, which must still name the whole (multi-crop)
GLOBAL_SCALE = (0.3, 1.0)
# brightness jitter and JPEG-like recompression of the global views. Wider (x0.4-1.6, JPEG half the time, crops from
# 25 %) together with --feature-nce 0.5, T 0.1 and batch 2048 trained a worse model in the same time box
# (docs/notes.md 18.6, results/runs/openclipart-ssl-h200-v2)
GLOBAL_BRIGHTNESS, GLOBAL_JPEG = 0.4, 0.3
ALIGN_TEMPERATURE = 0.1  # of the narrow levels' InfoNCE on backbone embeddings


class ProjectionHead(nn.Module):
    """SimCLR's MLP head: the contrastive loss is taken on its output, retrieval uses what goes in."""

    def __init__(self, dim: int, hidden: int = PROJ_HIDDEN, out: int = PROJ_DIM):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Linear(hidden, out))

    def forward(self, x):
        return self.net(x)


class SSLNet(nn.Module):
    """The encoder and its training-only projection head, optimised (and checkpointed) together."""

    def __init__(self, encoder: MatMambaVision):
        super().__init__()
        self.encoder, self.head = encoder, ProjectionHead(encoder.config.d_model)

    def no_weight_decay(self) -> set[str]:
        return {"encoder." + k for k in self.encoder.no_weight_decay()}


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row i of q must pick row i of k among all rows of k (cosine similarities / temperature)."""
    logits = F.normalize(q.float(), dim=-1) @ F.normalize(k.float(), dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


def view_specs(img_size: int) -> tuple[ViewSpec, ViewSpec]:
    return (ViewSpec(img_size, scale=GLOBAL_SCALE, brightness=GLOBAL_BRIGHTNESS, jpeg=GLOBAL_JPEG),
            ViewSpec(max(16, img_size // 2), scale=LOCAL_SCALE, jpeg=0.0, blur=0.2))


def make_views(x: torch.Tensor, config, local_crops: int, gen: torch.Generator):
    """uint8 batch -> (2b global views, local_crops * b local views or None), normalised for the model."""
    global_spec, local_spec = view_specs(config.img_size)
    norm = lambda v: TF.normalize(v, list(config.mean), list(config.std))
    globals_ = norm(torch.cat([augment(x, global_spec, gen), augment(x, global_spec, gen)]))
    locals_ = norm(torch.cat([augment(x, local_spec, gen) for _ in range(local_crops)])) if local_crops else None
    return globals_, locals_


def ssl_losses(net: SSLNet, globals_: torch.Tensor, locals_: torch.Tensor | None, levels, temperature: float,
               amp_ctx, feature_nce: float = 0.0) -> tuple[torch.Tensor, dict]:
    """(the step's loss, each level's loss as a detached 0-d tensor) for one batch of views (see the module
    docstring). Nothing here waits for the GPU: the caller reads the losses when it logs them."""
    b = len(globals_) // 2
    enc = net.encoder
    with amp_ctx:
        z = enc.embed(globals_, level=1)
        p = net.head(z)
        p1, p2 = p[:b], p[b:]
        loss_d = (info_nce(p1, p2, temperature) + info_nce(p2, p1, temperature)) / 2
        if locals_ is not None:  # each small view picks its image's two global views
            pl = net.head(enc.embed(locals_, level=1))
            n_local = len(pl) // b
            local = sum(info_nce(pl[i * b:(i + 1) * b], pg, temperature) for i in range(n_local) for pg in (p1, p2))
            loss_d = (loss_d + local / 2) / (1 + n_local)
        if feature_nce:  # the searched vector itself: each global view's embedding picks the other view's
            loss_d = loss_d + feature_nce * (info_nce(z[:b], z[b:], ALIGN_TEMPERATURE)
                                             + info_nce(z[b:], z[:b], ALIGN_TEMPERATURE)) / 2
        losses, total = {1: loss_d.detach()}, loss_d
        target = z.detach().float()
        t1, t2 = target[:b], target[b:]
        for level in levels:
            if level == 1:
                continue
            zl = enc.embed(globals_, level=level).float()
            cross = (info_nce(zl[:b], t2, ALIGN_TEMPERATURE) + info_nce(zl[b:], t1, ALIGN_TEMPERATURE)) / 2
            same = (1 - F.cosine_similarity(zl, target, dim=-1)).mean()
            losses[level] = (cross + same).detach()
            total = total + cross + same
    return total / len(levels), losses


def _load_data(tc, config, out: Path, log):
    spec = tc.data[len("folder:"):] if tc.data.startswith("folder:") else tc.data
    if spec.startswith("imagefolder:") or spec == "fashion-mnist":
        raise ValueError(f"--objective self-supervised trains on a plain folder of images (--data DIR), not {spec!r}")
    if is_cache(spec):
        cache = open_cache(spec)
    else:
        if not Path(spec).is_dir():
            raise FileNotFoundError(f"image folder {spec} does not exist or is not a folder")
        cache = build_cache(spec, Path(tc.cache) if tc.cache else out / "cache", config.img_size, config.crop,
                            workers=tc.workers, log=log)
    if cache.size != config.img_size or cache.images.shape[1] != config.in_chans:
        raise ValueError(f"the cache {cache.directory} holds {cache.images.shape[1]}-channel {cache.size} px images; "
                         f"{config.name} trains on {config.in_chans}-channel {config.img_size} px")
    if tc.limit:
        cache.keys, cache.images = cache.keys[:tc.limit], cache.images[:tc.limit]
    return cache


def _checkpoint(path: Path, net, opt, step, total_steps, tc, seconds, ema) -> None:
    tmp = path.with_name(path.name + ".tmp")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and next(net.parameters()).is_cuda:
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": step, "total_steps": total_steps,
                "train_config": asdict(tc), "rng": rng, "train_seconds": seconds,
                **({"ema": ema.module.state_dict()} if ema is not None else {})}, tmp)
    tmp.replace(path)


def train_ssl(tc) -> dict:
    from .train import lr_at, param_groups  # the supervised trainer's schedule and decay rule

    if tc.arch != "matmamba" or tc.teacher or tc.mnm_samples or tc.mix_prob or tc.distill:
        raise ValueError("--objective self-supervised trains the MatMamba encoder alone: no --arch, --teacher, "
                         "--mnm-samples, --mix-prob or --distill")
    device = torch.device(tc.device if tc.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    log = lambda msg: tqdm.write(str(msg), file=sys.stderr)
    overrides = dict(tc.overrides)
    if tc.drop_path is not None:
        overrides["drop_path_rate"] = tc.drop_path
    config = get_config(tc.model, **overrides)
    if 1 not in tc.levels:
        raise ValueError("--objective self-supervised needs level 1 (D) in --levels: the others are distilled to it")
    for lv in tc.levels:
        config.resolve_widths(level=lv)
    cache = _load_data(tc, config, out, log)
    n = len(cache)
    if n < tc.batch_size:
        raise ValueError(f"{n} images make no full batch of --batch-size {tc.batch_size}")
    steps_per_epoch = n // tc.batch_size
    net = SSLNet(MatMambaVision(config, ssd_backend=tc.backend)).to(device)
    opt = torch.optim.AdamW(param_groups(net, tc.weight_decay), lr=tc.lr, fused=device.type == "cuda")
    ema = ModelEmaV3(net.encoder, decay=tc.ema_decay, use_warmup=True) if tc.ema_decay > 0 else None
    total_steps, step, earlier, planned = steps_per_epoch * tc.epochs, 0, 0.0, False
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        step, total_steps, earlier, planned = state["step"], state["total_steps"], state["train_seconds"], True
        torch.set_rng_state(state["rng"]["cpu"].cpu())
        if "cuda" in state["rng"] and device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())
        log(f"resuming from {ckpt} at step {step}/{total_steps}")
    amp_ctx = torch.autocast("cuda", dtype=torch.bfloat16) if tc.amp and device.type == "cuda" else nullcontext()
    (out / "train_config.json").write_text(json.dumps(asdict(tc), indent=2))
    metrics = open(out / "metrics.jsonl", "a")
    log(f"{cache.directory}: {n} images ({len(cache.skipped)} skipped, {len(cache.duplicates)} duplicates dropped); "
        f"{steps_per_epoch} steps per epoch, levels {list(tc.levels)}, {tc.local_crops} local crops")
    bar = tqdm(total=total_steps, initial=step, dynamic_ncols=True, mininterval=2)
    t_start, wall, seen, first = time.time(), 0.0, 0, step
    t_timed = None  # wall clock from the end of the first step (which compiles and autotunes), read after a sync
    cap = steps_per_epoch * tc.epochs
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    budget = TimeBudget(tc.max_minutes, first, planned=planned)
    losses: dict = {}
    net.train()
    while step < total_steps and not budget.out_of_time():
        epoch = step // steps_per_epoch
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(tc.seed * 1000 + epoch)).numpy()
        i = step % steps_per_epoch
        x = uint8_batch(cache, perm[i * tc.batch_size:(i + 1) * tc.batch_size], device)
        gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
        globals_, locals_ = make_views(x, config, tc.local_crops, gen)
        warmup = warmup_steps(int(tc.warmup_epochs * steps_per_epoch), total_steps, tc.max_minutes is not None)
        lr = lr_at(step, total_steps, warmup, tc.lr, tc.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, losses = ssl_losses(net, globals_, locals_, tc.levels, tc.temperature, amp_ctx, tc.feature_nce)
        loss.backward()
        # no .item() per step: the host queues the next step while the GPU runs this one; values are read to log
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), tc.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if ema is not None:
            ema.update(net.encoder, step)
        if step == first + 1:  # the first step pays for compilation and autotuning: not timed
            sync()
            t_timed = time.time()
            budget.first_step_done(step)
        else:
            seen += len(x)
        logging = step % 20 == 0 or step == total_steps
        checkpointing = step % tc.ckpt_every == 0 or step == total_steps
        plan = budget.due(step)
        if logging or checkpointing or plan:
            sync()
            wall = time.time() - t_timed if t_timed is not None else 0.0
        if plan:  # the cosine schedule fitted to the time left (training/budget.py)
            total_steps = budget.fit(step, total_steps, cap)
            bar.total = total_steps
            log(f"--max-minutes {tc.max_minutes}: {budget.rate:.2f} steps/s, planning {total_steps} steps "
                f"({total_steps / steps_per_epoch:.1f} epochs)")
        bar.update(1)
        if logging:
            img_s = seen / max(wall, 1e-9)
            losses = {lv: float(v) for lv, v in losses.items()}
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{img_s:.0f}", lr=f"{lr:.1e}")
            metrics.write(json.dumps({"step": step, "epoch": step / steps_per_epoch, "lr": lr,
                                      "grad_norm": float(grad_norm), "images_per_s": img_s,
                                      **{("loss_D" if lv == 1 else f"loss_D/{lv}"): v
                                         for lv, v in losses.items()}}) + "\n")
            metrics.flush()
        if checkpointing:
            _checkpoint(ckpt, net, opt, step, total_steps, tc, earlier + wall, ema)
    bar.close()
    metrics.close()
    sync()
    wall = time.time() - t_timed if t_timed is not None else 0.0
    if step < total_steps:
        log(f"stopping at step {step}/{total_steps}: --max-minutes {tc.max_minutes} reached")
        _checkpoint(ckpt, net, opt, step, total_steps, tc, earlier + wall, ema)
    final = ema.module if ema is not None else net.encoder
    result = {"objective": "self-supervised", "images": n, "skipped_images": len(cache.skipped),
              "duplicates_dropped": len(cache.duplicates), "steps": step, "total_steps": total_steps,
              "epochs_done": step / steps_per_epoch, "train_seconds_total": earlier + wall,
              "train_seconds_this_run": time.time() - t_start,
              "final_losses": {str(k): float(v) for k, v in losses.items()},
              "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                         else platform.processor() or platform.machine()),
              "torch": torch.__version__, "data": str(cache.source or cache.directory)}
    save_pretrained(final, out / "model", dtype=torch.bfloat16, extra={"train_config": asdict(tc), "result": result})
    (out / "result.json").write_text(json.dumps({**result, "skipped": cache.skipped}, indent=2))
    print(json.dumps(result))
    return result


def write_model_card(model_dir: str | Path, report: dict, name: str) -> Path:
    """README.md of a self-supervised model folder, from its saved train config and result and a folder-eval report
    (evaluation/folder_eval.py) that measured it first among its baselines."""
    from vision_model.fileio import atomic_write
    from vision_model.hub import read_config, weights_hash

    from evaluation.folder_eval import TRANSFORMS

    model_dir = Path(model_dir)
    config, meta = read_config(model_dir)
    tc, res = meta.get("train_config", {}), meta.get("result", {})
    records = report["records"]
    ours = records[0]["encoder"]
    row = lambda r: (f"| {r['encoder']} | {r['level']} | {100 * r['topic_top1']:.1f} | {100 * r['topic_map@10']:.1f} | "
                     + " | ".join(f"{100 * r['copy_' + t]:.1f}" for t in TRANSFORMS) + " |")
    header = ["| encoder | query level | topic 1-NN (%) | topic mAP@10 (%) | "
              + " | ".join(f"copy {t} (%)" for t in TRANSFORMS) + " |", "|---" * (4 + len(TRANSFORMS)) + "|"]
    lines = [
        f"# {name}: nested MatMamba-Vision for colour clip art, trained without labels", "",
        "A MatMamba-Vision encoder whose four granularities (D, D/2, D/4, D/8) embed into one space: index a folder "
        "at D, query it at any level. Load it with `vision_model.load_model(\"" + name + "\")`.", "",
        "## Data", "",
        f"{res.get('images')} distinct images of Debian's `openclipart-png` ({res.get('duplicates_dropped')} "
        f"duplicates by decoded pixels dropped, {res.get('skipped_images')} files skipped), transparency composited "
        "on black or white, whichever contrasts with the picture (vision_model.images.flatten), fitted into "
        f"{config.img_size}x{config.img_size} ({config.crop}). The topic folders were never read in training; "
        "evaluation uses them as held-out labels.", "",
        "## Objective and recipe", "",
        f"Self-supervised (`matsearch train --objective self-supervised`, training/ssl.py): multi-crop InfoNCE at D "
        f"through a projection head (2 global views + {tc.get('local_crops')} local views of half the size, "
        f"temperature {tc.get('temperature')})"
        + (f", plus {tc['feature_nce']:g} x InfoNCE between the two global views on the retrieval vector itself"
           if tc.get("feature_nce") else "")
        + "; each narrower level is distilled into D's embedding space (InfoNCE "
        "to the other view's D embedding plus cosine to the same view's, D as a fixed target). Augmentations on the "
        f"GPU: random resized crop, flip, colour jitter (brightness x{1 - GLOBAL_BRIGHTNESS:g}-{1 + GLOBAL_BRIGHTNESS:g} "
        "on the global views), greyscale, blur, JPEG-like compression. AdamW (weight "
        f"decay {tc.get('weight_decay')}), lr {tc.get('lr')}, batch {tc.get('batch_size')}, warm-up "
        f"{tc.get('warmup_epochs')} epochs then cosine, bf16 autocast. Trained {res.get('epochs_done', 0):.0f} "
        f"epochs ({res.get('steps')} steps) in {res.get('train_seconds_total', 0) / 60:.1f} min on one "
        f"{res.get('device')}" + (f", planned to a {tc['max_minutes']:g}-minute budget" if tc.get("max_minutes")
                                  else "") + ". Retrieval uses the backbone's final-norm CLS feature (pre-head).", "",
        "## Config", "", "| field | value |", "|---|---|",
        *[f"| {k} | {getattr(config, k)} |" for k in ("img_size", "patch_size", "stem", "d_model", "depth", "d_state",
                                                        "headdim", "scan_orders")], "",
        f"## Results ({report['images']} images; {report['topic_queries']} held-out topic queries over "
        f"{len(report['topics'])} topics, leave-one-out, database at D; {report['copy_queries']} copy queries per "
        "transform against the whole collection at D)", "", *header,
        *[row(r) for r in records if r["encoder"] == ours], "", "Baselines measured in the same run:", "", *header,
        *[row(r) for r in records if r["encoder"] != ours], "",
        f"Weights: `model.safetensors` (bf16), sha256 `{weights_hash(model_dir)}`."]
    atomic_write(model_dir / "README.md", ("\n".join(lines) + "\n").encode())
    return model_dir / "README.md"
