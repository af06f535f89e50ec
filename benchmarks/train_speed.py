"""`matsearch bench train`: training speed, forward + backward + AdamW, per level and for the joint nested step,
beside timm ViTs of the same token count measured in the same run.

    matsearch bench train --device cuda --batch 1024                 # the issue-28 configuration (96 px, 144 tokens)
    matsearch bench train --off conv,split --compile                 # with fusions off / torch.compile on
    matsearch bench train --model matmamba_vision_35m --img-size 224 --batch 256 --vits vit_small_patch16_224
    matsearch bench train --device cpu --tiny                        # a two-layer model in seconds (CI)

A step is what `matsearch train` runs (`training.train.train_step`): the schedule's level passes with their losses,
backward, gradient clipping and a fused AdamW step, under bf16 autocast on CUDA. Rows: each level alone, the joint
step of each --schedules entry (all: every level on the whole batch; sampled: D plus one narrower level in turn,
timed over a whole turn and reported per step), D forward only (no autograd), and each ViT. Timing follows
`benchmarks.measure`: untimed warm-up calls (Triton autotuning, compilation), then the median of timed calls.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn.functional as F

import vision_model
from vision_model.ops.backends import TrainFusions, current_fusions, train_fusions
from training.train import TrainConfig, param_groups, step_levels, train_step

from .measure import environment, free_memory, measure, run_unless_oom
from .models import level_label, parse_model_spec

# the configuration of issue 28: a clip-art-sized encoder a user would train on their own folder (11.8M parameters)
ISSUE_MODEL = ("matmamba_vision_35m:img_size=96:patch_size=8:stem=conv:d_model=384:depth=12:d_state=64:headdim=16:"
               "scan_orders=('row','row_rev','col','col_rev')")
# ViT-S/8 and ViT-Ti/8: the same 144 patch tokens + CLS at 96 px
ISSUE_VITS = ("vit_small_patch16_224:patch_size=8", "vit_tiny_patch16_224:patch_size=8")
TINY_MODEL = "matmamba_vision_fmnist:depth=2:d_model=64:d_state=16"
TINY_VIT = "vit_tiny_patch16_224:depth=2:embed_dim=32:num_heads=2:patch_size=4"
SCHEDULES = ("all", "sampled")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="NAME[:key=value...]",
                   help=f"MatMamba config with overrides (default: the issue-28 configuration, {ISSUE_MODEL})")
    p.add_argument("--img-size", type=int, default=None, help="square input size (default: the config's)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 1024 on CUDA, 8 on CPU)")
    p.add_argument("--levels", default="1,2,4,8", help="levels timed alone and trained by the joint step")
    p.add_argument("--schedules", default=",".join(SCHEDULES),
                   help="joint steps to time: all (every level every step), sampled (D + one narrower level)")
    p.add_argument("--vits", nargs="*", default=None, metavar="TIMM_NAME[:key=value...]",
                   help="timm models timed on the same images (default: ViT-S/8 and ViT-Ti/8)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the stem and blocks (compile_training)")
    p.add_argument("--off", default="", metavar="FUSION[,FUSION...]",
                   help=f"training fusions to turn off: {', '.join(TrainFusions.names())}")
    p.add_argument("--no-forward", dest="forward", action="store_false", help="skip the forward-only row")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per row (default CUDA 5, CPU 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row (default CUDA 2, CPU 1)")
    p.add_argument("--tiny", action="store_true", help=f"a two-layer model and ViT at 28 px ({TINY_MODEL}): CI")
    p.add_argument("--out", type=Path, default=None, help="write train_speed.json here")
    p.add_argument("--debug", action="store_true", help="full tracebacks")


def fusion_flags(off: str) -> dict[str, bool]:
    names = [n for n in off.split(",") if n]
    unknown = set(names) - set(TrainFusions.names())
    if unknown:
        raise ValueError(f"--off: unknown fusion(s) {sorted(unknown)}; known: {TrainFusions.names()}")
    return {n: False for n in names}


def build_encoder(spec_text: str, img_size: int | None, device: torch.device) -> vision_model.MatMambaVision:
    spec = parse_model_spec(spec_text)
    if not spec.is_matmamba:
        raise ValueError(f"--model must be a MatMamba-Vision config, got {spec.name!r}")
    overrides = dict(spec.overrides)
    if img_size is not None:
        overrides["img_size"] = img_size
    return vision_model.create_model(spec.name, **overrides).to(device).train()


def encoder_step(model, tc: TrainConfig, x, y, amp_ctx) -> Callable[[], None]:
    """A call that runs the trainer's step (`train_step`) on (x, y); steps count on, so `sampled` takes its turns."""
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=1e-4, fused=x.device.type == "cuda")
    share_stem = current_fusions().shared_stem
    counter = iter(range(10 ** 9))
    turn = max(1, len(tc.levels) - 1) if tc.schedule == "sampled" else 1

    def call():
        for _ in range(turn):  # a whole turn of the sampled schedule per call, reported per step
            train_step(model, model, opt, x, y, tc, next(counter), amp_ctx, share_stem=share_stem)
    call.steps = turn
    return call


def timm_step(model, x, y, amp_ctx) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=x.device.type == "cuda")

    def call():
        with amp_ctx:
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    call.steps = 1
    return call


def time_row(name: str, call: Callable, batch: int, device, warmup: int, repeats: int, **extra) -> dict:
    timing, oom = run_unless_oom(lambda: measure(call, device, warmup=warmup, repeats=repeats))
    row = {"row": name, "batch": batch, **extra}
    if oom is not None:
        return {**row, "status": "oom", "error": oom}
    step_s = timing.median_s / getattr(call, "steps", 1)
    return {**row, "status": "ok", "step_ms": 1e3 * step_s, "images_per_s": batch / step_s,
            "peak_mem_gib": None if timing.peak_mem_bytes is None else timing.peak_mem_bytes / 2 ** 30,
            "warmup_s": timing.warmup_s}


def bench(model_spec: str, img_size: int | None, batch: int, levels: tuple[int, ...], schedules: list[str],
          vits: list[str], device: torch.device, off: dict[str, bool], compile: bool = False, forward: bool = True,
          warmup: int = 2, repeats: int = 5, log: Callable[[dict], None] = print, label: str = "",
          solo: tuple[int, ...] | None = None) -> list[dict]:
    """The rows of one configuration; `off` turns fusions off (`train_fusions`), `label` tags every row. `solo`:
    the levels timed alone (default: all of `levels`, which the joint steps train)."""
    torch.manual_seed(0)
    model = build_encoder(model_spec, img_size, device)
    cfg = model.config
    if compile:
        model.compile_training()
    amp_ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    base = TrainConfig(model=model_spec, levels=levels, clip_grad=1.0)
    tag = dict(label=label, fusions_off=sorted(off), compile=compile,
               params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    rows = []

    def add(row):
        rows.append(row)
        log(row)

    with train_fusions(**off):
        for lv in (levels if solo is None else solo):
            tc = replace(base, levels=(lv,), schedule="all")
            add(time_row(level_label(lv), encoder_step(model, tc, x, y, amp_ctx), batch, device, warmup, repeats,
                         **tag))
        for schedule in schedules:
            tc = replace(base, schedule=schedule)
            n = len(step_levels(tc, 0)[0])
            add(time_row(f"joint:{schedule}", encoder_step(model, tc, x, y, amp_ctx), batch, device, warmup,
                         repeats, passes=n, **tag))
        if forward:
            def fwd():
                with torch.no_grad(), amp_ctx:
                    model.embed(x)
            add(time_row("D forward only", fwd, batch, device, warmup, repeats, **tag))
    del model
    free_memory()
    for spec_text in vits:
        spec = parse_model_spec(spec_text)
        vit = timm.create_model(spec.name, pretrained=False, num_classes=cfg.num_classes, img_size=cfg.img_size,
                                in_chans=cfg.in_chans, **dict(spec.overrides)).to(device).train()
        add(time_row(spec_text, timm_step(vit, x, y, amp_ctx), batch, device, warmup, repeats, label=label,
                     params_m=sum(p.numel() for p in vit.parameters()) / 1e6))
        del vit
        free_memory()
    d = next((r for r in rows if r["row"] == "D" and r["status"] == "ok"), None)
    for r in rows:
        if d is not None and r["status"] == "ok" and r is not d:
            r["step_vs_D"] = r["step_ms"] / d["step_ms"]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| label | row | batch | img/s | step ms | x D step | peak GiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r.get('label', '')} | {r['row']} | {r['batch']} | {r['status']} | | | |")
            continue
        mem = "" if r.get("peak_mem_gib") is None else f"{r['peak_mem_gib']:.1f}"
        ratio = f"{r['step_vs_D']:.2f}" if "step_vs_D" in r else ""
        lines.append(f"| {r.get('label', '')} | {r['row']} | {r['batch']} | {r['images_per_s']:,.0f} | "
                     f"{r['step_ms']:.1f} | {ratio} | {mem} |")
    return "\n".join(lines)


def write(out: Path | None, rows: list[dict], device: torch.device, **meta) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "train_speed.json.tmp"
    tmp.write_text(json.dumps({"environment": environment(device), **meta, "rows": rows}, indent=2))
    tmp.replace(out / "train_speed.json")


def run(args: argparse.Namespace) -> int:
    from .resolution import resolve_device
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    model = args.model or (TINY_MODEL if args.tiny else ISSUE_MODEL)
    vits = args.vits if args.vits is not None else ([TINY_VIT] if args.tiny else list(ISSUE_VITS))
    batch = args.batch or (1024 if on_gpu else 8)
    levels = tuple(int(v) for v in args.levels.split(","))
    schedules = [s for s in args.schedules.split(",") if s]
    if set(schedules) - set(SCHEDULES):
        raise ValueError(f"--schedules takes {SCHEDULES}, got {schedules}")
    started = time.time()
    rows = bench(model, args.img_size, batch, levels, schedules, vits, device, fusion_flags(args.off),
                 compile=args.compile, forward=args.forward,
                 warmup=args.warmup if args.warmup is not None else (2 if on_gpu else 1),
                 repeats=args.repeats if args.repeats is not None else (5 if on_gpu else 2),
                 log=lambda r: print(json.dumps(r), flush=True))
    write(args.out, rows, device, model=model, img_size=args.img_size, seconds=time.time() - started)
    print(table(rows))
    return 0
