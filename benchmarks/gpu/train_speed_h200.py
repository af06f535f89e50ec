"""GPU run for issue 28 (not part of CI): training speed before/after each fusion, in one process, within minutes.

    python3 -m benchmarks.gpu.train_speed_h200 --out $OUT [--budget 270] [--fmnist-epochs 4] [--quick]

Needs CUDA and mamba-ssm (the wheel in /work/shared/wheels). Sections, in priority order; each starts only while
the time budget lasts:
1. agreement: gradients of the fused training path (every fusion on, triton backend) against the PyTorch reference
   path (backend torch), fp32 and bf16 autocast, the issue configuration at batch 4; the Triton conv backward
   against autograd through F.conv1d on a block-sized bf16 input.
2. the issue configuration (96 px, conv stem, patch 8, d_model 384, depth 12, d_state 64, headdim 16, four scan
   orders; batch 1024, bf16): every fusion on: each level, the joint steps (all, sampled), forward only, ViT-S/8
   and ViT-Ti/8.
3. before/after: the D step and the four-pass joint step with every fusion off (the training path before issue 28),
   then the D step with the fusions turned on one at a time (block, split, norm_linear, conv; shared_stem acts on
   the joint step only).
4. the SSD chunk size: D step at chunk 64 and 128 (the config's 256 is section 2).
5. the 35M configuration at 224 px (196 tokens + CLS, batch 256): D, joint all and sampled, timm ViT-S/16.
6. torch.compile (compile_training): D and joint sampled.
7. Fashion-MNIST (when the data is found and --fmnist-epochs > 0): the schedules `all` and `sampled` trained for the
   same few epochs, test top-1 per level and training seconds.
Prints one JSON line per row as it goes and a short table last; writes train_speed_h200.json under --out.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.measure import rel_error as rel
from benchmarks.train_speed import ISSUE_MODEL, ISSUE_VITS, bench, build_encoder, table, write
from vision_model.datasets import fashion_mnist_dir
from vision_model.ops.backends import TrainFusions, train_fusions, triton_chunk_scan
from vision_model.ops.conv import causal_conv1d_silu_ref, causal_conv1d_silu_train

MODEL_35M_224 = "matmamba_vision_35m:img_size=224:patch_size=16:d_model=512:depth=20:headdim=16"
ALL_OFF = {name: False for name in TrainFusions.names()}


def agreement(device) -> dict:
    out = {}
    model = build_encoder(ISSUE_MODEL, None, device)
    x = torch.randn(4, 3, 96, 96, device=device)
    y = torch.randint(0, model.config.num_classes, (4,), device=device)
    for dtype_name, ctx in (("fp32", torch.autocast("cuda", enabled=False)),
                            ("bf16", torch.autocast("cuda", dtype=torch.bfloat16))):
        for level in (1, 8):
            grads = []
            for backend in ("triton", "torch"):
                model.zero_grad()
                with ctx:
                    loss = F.cross_entropy(model(x, level=level, backend=backend).float(), y)
                loss.backward()
                grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            errs = {n: rel(grads[0][n], grads[1][n]) for n in grads[1]}
            worst = max(errs, key=errs.get)
            out[f"{dtype_name} D/{level}" if level > 1 else f"{dtype_name} D"] = {
                "max_rel_err": errs[worst], "worst_param": worst,
                "median_rel_err": sorted(errs.values())[len(errs) // 2]}
    # the conv alone, block-sized, bf16 activations (weights fp32 as in training)
    c = 2 * 768 + 2 * 64
    wide = torch.randn(256, 145, c + 48, device=device, dtype=torch.bfloat16)
    xs = wide[..., 768:768 + 768 + 128]
    w, b = torch.randn(896, 1, 4, device=device) * 0.5, torch.randn(896, device=device)
    dy = torch.randn(256, 145, 896, device=device, dtype=torch.bfloat16)
    ref_leaves = [xs.float().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
    ref = torch.autograd.grad(causal_conv1d_silu_ref(*ref_leaves), ref_leaves, dy.float())
    leaves = [xs.detach().clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
    got = torch.autograd.grad(causal_conv1d_silu_train(*leaves), leaves, dy)
    out["conv bf16 vs fp32 ref"] = {name: rel(g, r) for name, g, r in zip(("dx", "dweight", "dbias"), got, ref)}
    return out


def fmnist_comparison(epochs: int, out_dir: Path, log) -> list[dict]:
    from training.train import TrainConfig, train
    rows = []
    for schedule in ("all", "sampled"):
        tc = TrainConfig(epochs=epochs, batch_size=2048, lr=3e-3, warmup_epochs=1, schedule=schedule,
                         out=str(out_dir / f"fmnist_{schedule}"), eval_every=epochs, ckpt_every=10 ** 9)
        started = time.time()
        result = train(tc)
        row = {"row": f"fmnist {epochs} ep {schedule}", "test_top1": result["test_top1"],
               "train_seconds": result["train_seconds_total"], "wall_s": time.time() - started}
        rows.append(row)
        log(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", type=float, default=270.0, help="seconds after which no new section starts")
    p.add_argument("--fmnist-epochs", type=int, default=4, help="0: skip the Fashion-MNIST comparison")
    p.add_argument("--quick", action="store_true", help="batch 64 / 16 and one repeat: a smoke test of the script")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    if triton_chunk_scan() is None:
        raise SystemExit("needs mamba-ssm (pip install --no-deps the wheel from /work/shared/wheels)")
    device = torch.device("cuda")
    started = time.time()
    left = lambda: args.budget - (time.time() - started)
    big, mid = (64, 16) if args.quick else (1024, 256)
    reps = dict(warmup=1, repeats=1) if args.quick else dict(warmup=2, repeats=5)
    rows, result = [], {"sections_skipped": []}
    log = lambda r: print(json.dumps(r), flush=True)

    def section(name, fn, min_left=20.0):
        if left() < min_left:
            result["sections_skipped"].append(name)
            print(f"-- skipping {name}: {left():.0f} s of the budget left", flush=True)
            return
        t0 = time.time()
        print(f"-- {name}", flush=True)
        fn()
        result.setdefault("section_seconds", {})[name] = time.time() - t0
        write(args.out, rows, device, **result, seconds=time.time() - started, name="train_speed_h200")

    def run_bench(**kw):
        rows.extend(bench(**{**dict(model_spec=ISSUE_MODEL, img_size=None, batch=big, levels=(1, 2, 4, 8),
                                    schedules=["all", "sampled"], vits=[], device=device, off={}, log=log), **reps,
                             **kw}))

    section("agreement", lambda: result.update(agreement=agreement(device)))
    print(json.dumps(result.get("agreement")), flush=True)
    section("issue config, every fusion",
            lambda: run_bench(vits=list(ISSUE_VITS), label="fused"))
    section("before: every fusion off",
            lambda: run_bench(off=ALL_OFF, solo=(1,), schedules=["all"], forward=False, label="before"))

    def one_at_a_time():
        on = []
        for name in ("block", "split", "norm_linear", "conv"):
            on.append(name)
            run_bench(off={n: False for n in TrainFusions.names() if n not in on}, solo=(1,), schedules=[],
                      forward=False, label="+" + name)
    section("fusions one at a time", one_at_a_time)

    def chunks():
        for chunk in (64, 128):
            run_bench(model_spec=f"{ISSUE_MODEL}:chunk_size={chunk}", solo=(1,), schedules=[], forward=False,
                      label=f"chunk {chunk}")
    section("chunk size", chunks)
    section("35M at 224 px", lambda: run_bench(model_spec=MODEL_35M_224, batch=mid, solo=(1,),
                                               vits=["vit_small_patch16_224"], label="35M 224px"), min_left=45)
    section("torch.compile", lambda: run_bench(compile=True, solo=(1,), schedules=["sampled"], forward=False,
                                               label="compile"), min_left=90)
    if args.fmnist_epochs > 0 and (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").exists():
        with tempfile.TemporaryDirectory() as tmp:
            section("fashion-mnist all vs sampled",
                    lambda: result.update(fmnist=fmnist_comparison(args.fmnist_epochs, Path(tmp), log)),
                    min_left=60)
    else:
        result["sections_skipped"].append("fashion-mnist (no data found or --fmnist-epochs 0)")
    write(args.out, rows, device, **result, seconds=time.time() - started, name="train_speed_h200")
    print(f"\ntotal {time.time() - started:.0f} s; skipped: {result['sections_skipped'] or 'nothing'}")
    for name, value in (result.get("agreement") or {}).items():
        print(f"agreement {name}: {value}")
    for row in result.get("fmnist", []):
        print(f"{row['row']}: {row['test_top1']} in {row['train_seconds']:.0f} s")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
