"""Issue 28, one short GPU section: where a D training step's time goes, and the SSD's chunk size and head dim.

    python3 -m benchmarks.gpu.train_profile --out $OUT [--budget 50] [--kernels] [--off-rows a,b] [--chunks ""]
    python3 -m benchmarks.gpu.train_profile --device cpu --tiny --out /tmp/p      # the script itself, in seconds

Needs CUDA and mamba-ssm (the wheel in /work/shared/wheels) on the GPU. The issue configuration
(`benchmarks.train_speed.ISSUE_MODEL`, batch 1024, bf16, every training fusion on), in priority order:
0. with --kernels (CUDA): the training kernels of our own at one layer of that configuration, launch parameters
   swept (kernels.jsonl: one line per launch, ms and bf16 error against the fp32 PyTorch definition), beside what
   they replace: the causal conv's backward against cuDNN's (PyTorch's reference under autograd), the gated
   RMSNorm's backward against mamba-ssm's. Seconds: no autotuning.
1. the D step (`training.train.train_step`, as `matsearch bench train` times it): one untimed call (it compiles and
   autotunes the Triton kernels: reported as first_step_s), then timed calls; then one step under torch.profiler:
   the top kernels by self time (name, total ms, share of the step's kernel time, calls), the same kernels summed
   into coarse groups by name, and the trace (trace_d_step.json.gz under --out).
2. the D step with each fusion of --off-rows off (`train_fusions`), one at a time (default reorder_gather and
   stem_channels_last: the same kernels, so seconds each; a fusion whose fallback is mamba-ssm's kernel autotunes
   that kernel on its first call).
3. the D step at SSD chunk sizes --chunks (default 64, 128; the config's is 256), then at head dims --headdims
   (default 32, 64; same d_model and d_inner, fewer heads): each new shape autotunes mamba-ssm's kernels again on
   its first call (the chunk size and head dim are in their autotuning keys).
A hard deadline (--budget seconds from the start of main) stops whatever runs when it passes; a row is started only
when the time it is expected to take is left (a new shape's first call is expected to cost what the first D step's
did). The first D step compiles and autotunes every Triton kernel of the step (about 150 mamba-ssm configurations):
from a cold Triton cache that alone takes minutes, from a warm one seconds. The rows and the profile are written to
train_profile.json after each row; a compact table is printed last.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import re
import shutil
import signal
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.measure import cuda_event_ms, environment, free_memory, rel_error, synchronize
from benchmarks.train_speed import ISSUE_MODEL, TINY_MODEL, bench, build_encoder, encoder_step, time_row
from training.train import TrainConfig
from vision_model.ops.backends import triton_chunk_scan

# coarse groups of kernel names, first match wins (names as cuBLAS/cuDNN/Triton/ATen give them)
KERNEL_GROUPS = (
    ("SSD scan (mamba-ssm's chunks, or ours)", r"chunk|state_passing|bmm_chunk|ssd"),
    ("stem conv + BatchNorm (cuDNN/ATen)", r"batch_norm|bn_fw|bn_bw|welford|fprop|dgrad|wgrad|implicit|"
                                           r"nchwToNhwc|nhwcToNchw|conv2d|cudnn"),
    ("GEMM (cuBLAS)", r"gemm|nvjet|cutlass|xmma|matmul|aten::(add)?b?mm\b"),
    ("pre-norm / gated norm", r"layer_norm|rms_norm|rmsnorm"),
    ("causal conv1d (ours)", r"causal_conv1d"),
    ("gather / index (reorders)", r"index|gather|scatter"),
    ("optimizer, grad norm", r"adam|multi_tensor|foreach"),
    ("reductions", r"reduce"),
    ("elementwise / copies", r"elementwise|vectorized|unrolled|copy|fill|Memset|Memcpy"),
)


class Deadline(Exception):
    pass


def _deadline(signum, frame):
    raise Deadline()


def top_kernels(prof, device_type: str, n: int = 20) -> tuple[list[dict], list[dict], float]:
    """(top n kernels by self time, every kernel summed per KERNEL_GROUPS entry, total ms). On CUDA the rows are
    the device's kernels (memsets and copies included); on CPU, the operators' self CPU time."""
    rows = []
    for e in prof.key_averages():
        if device_type == "cuda":
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.self_device_time_total
        else:
            us = e.self_cpu_time_total
        if us > 0:
            rows.append({"kernel": e.key, "ms": us / 1e3, "calls": e.count})
    total = sum(r["ms"] for r in rows) or 1.0
    rows.sort(key=lambda r: r["ms"], reverse=True)
    groups: dict[str, float] = {}
    for r in rows:
        r["share"] = r["ms"] / total
        name = next((g for g, pattern in KERNEL_GROUPS if re.search(pattern, r["kernel"], re.IGNORECASE)), "other")
        groups[name] = groups.get(name, 0.0) + r["ms"]
    group_rows = sorted(({"group": g, "ms": ms, "share": ms / total} for g, ms in groups.items()),
                        key=lambda r: r["ms"], reverse=True)
    return rows[:n], group_rows, total


def profile_step(call, device: torch.device, out: Path) -> dict:
    """One call of `call` under torch.profiler: the kernel tables and the step's wall time, trace written gzipped."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        call()
        synchronize(device)
    wall_ms = 1e3 * (time.perf_counter() - t0)
    kernels, groups, total = top_kernels(prof, device.type)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "trace_d_step.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(out / "trace_d_step.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    return {"kernel_ms_total": total, "profiled_wall_ms": wall_ms, "top": kernels, "groups": groups}


def sweep_kernels(out: Path, batch: int, deadline: float) -> list[dict]:
    """The conv and gated-norm backwards of one layer of the issue configuration (d_inner 768, d_state 64: the conv
    reads 896 channels of in_proj's 1,712-wide bf16 output; 145 tokens), launch parameters swept; errors of the bf16
    kernels against autograd through the fp32 definitions."""
    from vision_model.ops.backends import mamba_ssm_op
    from vision_model.ops.conv import causal_conv1d_silu_bwd_triton, causal_conv1d_silu_ref
    from vision_model.ops.rmsnorm import gated_rms_norm_bwd_triton, gated_rms_norm_ref
    dev, l, inner, conv_c, width = torch.device("cuda"), 145, 768, 896, 1712
    rows: list[dict] = []

    def emit(**row):
        rows.append(row)
        with open(out / "kernels.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    torch.manual_seed(0)
    zx = torch.randn(batch, l, width, device=dev, dtype=torch.bfloat16)
    x = zx[..., inner:inner + conv_c]  # the strided x|B|C view the block's conv reads
    w, bias = 0.5 * torch.randn(conv_c, 1, 4, device=dev), 0.1 * torch.randn(conv_c, device=dev)
    dy = torch.randn(batch, l, conv_c, device=dev, dtype=torch.bfloat16)
    leaves = [t.float().clone().requires_grad_() for t in (x, w, bias)]
    ref = torch.autograd.grad(causal_conv1d_silu_ref(*leaves), leaves, dy.float())
    xb = x.clone().requires_grad_()
    yb = causal_conv1d_silu_ref(xb, w.bfloat16(), bias.bfloat16())  # cuDNN's depthwise conv, bf16 as under autocast
    emit(op="conv_bwd", impl="cudnn (reference under autograd)",
         ms=cuda_event_ms(lambda: torch.autograd.grad(yb, [xb], dy, retain_graph=True)))
    for block_c, warps, programs in [(c, wp, pg) for c in (32, 64, 128, 256) for wp in (1, 2, 4)
                                     for pg in (batch, batch // 4)]:
        if time.time() > deadline:
            break
        if block_c // 32 < warps:  # fewer channels than threads
            continue
        call = lambda: causal_conv1d_silu_bwd_triton(x, w, bias, dy, block_c=block_c, programs=programs,
                                                     num_warps=warps)
        got = call()
        errors = [rel_error(a, r) for a, r in zip(got, ref)]
        emit(op="conv_bwd", impl="triton", block_c=block_c, warps=warps, programs=programs, ms=cuda_event_ms(call),
             err=max(errors), err_dx_dw_db=errors)
    y = torch.randn(batch, l, inner, device=dev, dtype=torch.bfloat16)
    z = zx[..., :inner]
    nw, dout = torch.rand(inner, device=dev) + 0.5, torch.randn(batch, l, inner, device=dev, dtype=torch.bfloat16)
    leaves = [t.float().clone().requires_grad_() for t in (y, z, nw)]
    ref = torch.autograd.grad(gated_rms_norm_ref(*leaves, 1e-5), leaves, dout.float())
    rmsnorm_fn = mamba_ssm_op("layernorm_gated", "rmsnorm_fn")
    if rmsnorm_fn is not None:
        ym, zm, wm = (t.clone().requires_grad_() for t in (y, z.contiguous(), nw))
        om = rmsnorm_fn(ym, wm, None, z=zm, eps=1e-5, group_size=None, norm_before_gate=False)
        got = torch.autograd.grad(om, [ym, zm, wm], dout, retain_graph=True)
        emit(op="gated_norm_bwd", impl="mamba-ssm rmsnorm_fn", err=max(rel_error(a, r) for a, r in zip(got, ref)),
             ms=cuda_event_ms(lambda: torch.autograd.grad(om, [ym, zm, wm], dout, retain_graph=True)))
    for rpp, warps, programs in [(r, wp, pg) for r in (1, 2, 4, 8) for wp in (2, 4, 8) for pg in (1024, 4096, 16384)]:
        if time.time() > deadline:
            break
        call = lambda: gated_rms_norm_bwd_triton(y, z, nw, dout, 1e-5, rows_per_program=rpp, programs=programs,
                                                 num_warps=warps)
        got = call()
        emit(op="gated_norm_bwd", impl="triton", rows=rpp, warps=warps, programs=programs, ms=cuda_event_ms(call),
             err=max(rel_error(a, r) for a, r in zip(got, ref)))
    return rows


def format_report(result: dict) -> str:
    lines = [f"first D step (compile + autotune): {result.get('first_step_s', float('nan')):.1f} s; "
             f"total {result.get('seconds', 0):.0f} s; cut by the deadline: {result.get('cut') or 'nothing'}; "
             f"skipped: {', '.join(result.get('skipped', [])) or 'nothing'}",
             "", "| row | img/s | step ms | x D | first call s |", "|---|---|---|---|---|"]
    d = next((r for r in result["rows"] if r.get("label") == "D" and r["status"] == "ok"), None)
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['status']} | | | |")
            continue
        ratio = f"{r['step_ms'] / d['step_ms']:.2f}" if d else ""
        lines.append(f"| {r['label']} | {r['images_per_s']:,.0f} | {r['step_ms']:.1f} | {ratio} | "
                     f"{r['warmup_s']:.1f} |")
    kernels = result.get("kernels") or []
    for op in dict.fromkeys(k["op"] for k in kernels):
        runs = [k for k in kernels if k["op"] == op]
        base = [k for k in runs if k["impl"] != "triton"]
        ours = [k for k in runs if k["impl"] == "triton"]
        best = min(ours, key=lambda k: k["ms"]) if ours else None
        lines.append(f"{op}: " + "; ".join(f"{k['impl']} {k['ms']:.3f} ms" for k in base)
                     + (f"; ours best {best['ms']:.3f} ms at "
                        + ", ".join(f"{key} {best[key]}" for key in best if key not in ("op", "impl", "ms", "err"))
                        + f" (bf16 error {best['err']:.1e})" if best else ""))
    prof = result.get("profile")
    if prof:
        lines += ["", f"one D step under the profiler: {prof['kernel_ms_total']:.1f} ms of kernel time "
                      f"({prof['profiled_wall_ms']:.0f} ms wall)",
                  "| # | kernel | ms | share | calls |", "|---|---|---|---|---|"]
        for i, k in enumerate(prof["top"], 1):
            name = k["kernel"] if len(k["kernel"]) <= 90 else k["kernel"][:87] + "..."
            lines.append(f"| {i} | {name} | {k['ms']:.2f} | {100 * k['share']:.1f} % | {k['calls']} |")
        lines += ["", "| group (by kernel name) | ms | share |", "|---|---|---|"]
        lines += [f"| {g['group']} | {g['ms']:.2f} | {100 * g['share']:.1f} % |" for g in prof["groups"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", type=float, default=50.0, help="hard deadline, seconds from the start")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--batch", type=int, default=None, help="default 1024 (CUDA), 8 (CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per row")
    p.add_argument("--tiny", action="store_true", help=f"a two-layer model ({TINY_MODEL}): tests the script on CPU")
    p.add_argument("--kernels", action="store_true", help="first sweep our training kernels' launches (CUDA)")
    p.add_argument("--off-rows", default="reorder_gather,stem_channels_last",
                   help="fusions to time the D step without, one at a time (comma-separated; '' for none)")
    p.add_argument("--chunks", default=None, help="SSD chunk sizes to time (default 64,128; '' for none)")
    p.add_argument("--headdims", default=None, help="head dims to time (default 32,64; '' for none)")
    args = p.parse_args(argv)
    started = time.time()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs CUDA (or --device cpu --tiny to test the script)")
    if device.type == "cuda" and triton_chunk_scan() is None:
        raise SystemExit("needs mamba-ssm (pip install --no-deps the wheel from /work/shared/wheels)")
    spec = TINY_MODEL if args.tiny else ISSUE_MODEL
    chunks, headdims = ((8, 16), (32,)) if args.tiny else ((64, 128), (32, 64))
    ints = lambda text, default: default if text is None else tuple(int(v) for v in text.split(",") if v.strip())
    chunks, headdims = ints(args.chunks, chunks), ints(args.headdims, headdims)
    off_rows = [name for name in args.off_rows.split(",") if name.strip()]
    batch = args.batch or (1024 if device.type == "cuda" else 8)
    result = {"model": spec, "batch": batch, "rows": [], "skipped": [], "cut": None}
    signal.signal(signal.SIGALRM, _deadline)
    signal.setitimer(signal.ITIMER_REAL, args.budget)

    def save():
        result["seconds"] = time.time() - started
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = args.out / "train_profile.json.tmp"
        tmp.write_text(json.dumps({"environment": environment(device), **result}, indent=2))
        tmp.replace(args.out / "train_profile.json")

    def add(label, row):
        row = {**row, "label": label}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()

    def variant(label, model_spec, off=None):
        first = result.get("first_step_s", 0.0)
        new_shape = model_spec != spec
        expected = (first if new_shape else 0.0) + (args.repeats + 2) * result.get("step_s", 0.0) + 2.0
        if args.budget - (time.time() - started) < expected:
            result["skipped"].append(label)
            return
        rows = bench(model_spec, None, batch, (1,), [], [], device, off or {}, forward=False, warmup=1,
                     repeats=args.repeats, log=lambda r: None, solo=(1,))
        add(label, rows[0])

    try:
        if args.kernels and device.type == "cuda":
            args.out.mkdir(parents=True, exist_ok=True)
            result["kernels"] = sweep_kernels(args.out, batch, started + args.budget / 3)
            save()
        torch.manual_seed(0)
        model = build_encoder(spec, None, device)
        amp_ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                   else contextlib.nullcontext())
        cfg = model.config
        x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
        y = torch.randint(0, cfg.num_classes, (batch,), device=device)
        step = encoder_step(model, TrainConfig(model=spec, levels=(1,), clip_grad=1.0), x, y, amp_ctx)
        row = time_row("D", step, batch, device, 1, args.repeats)  # the untimed call compiles and autotunes
        result["first_step_s"], result["step_s"] = row.get("warmup_s", 0.0), row.get("step_ms", 0.0) / 1e3
        add("D", row)
        result["profile"] = profile_step(step, device, args.out)
        save()
        del model, step, x, y
        free_memory()
        for fusion in off_rows:
            variant(f"{fusion} off", spec, {fusion: False})
        for chunk in chunks:
            variant(f"chunk {chunk}", f"{spec}:chunk_size={chunk}")
        for hd in headdims:
            variant(f"headdim {hd}", f"{spec}:headdim={hd}")
    except Deadline:
        result["cut"] = f"at {time.time() - started:.0f} s (budget {args.budget:.0f} s)"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    save()
    print(format_report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
