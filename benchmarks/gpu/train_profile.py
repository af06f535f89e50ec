"""Issue 28, one short GPU section: where a D training step's time goes, and the SSD's chunk size and head dim.

    python3 -m benchmarks.gpu.train_profile --out $OUT [--budget 50]
    python3 -m benchmarks.gpu.train_profile --device cpu --tiny --out /tmp/p      # the script itself, in seconds

Needs CUDA and mamba-ssm (the wheel in /work/shared/wheels) on the GPU. The issue configuration
(`benchmarks.train_speed.ISSUE_MODEL`, batch 1024, bf16, every training fusion on), in priority order:
1. the D step (`training.train.train_step`, as `matsearch bench train` times it): one untimed call (it compiles and
   autotunes the Triton kernels: reported as first_step_s), then timed calls; then one step under torch.profiler:
   the top kernels by self time (name, total ms, share of the step's kernel time, calls), the same kernels summed
   into coarse groups by name, and the trace (trace_d_step.json.gz under --out).
2. the D step with reorder_gather and with stem_channels_last off (`train_fusions`), one at a time: the same
   kernels, so seconds each.
3. the D step at SSD chunk sizes 64 and 128 (the config's is 256), then at head dim 32 and 64 (same d_model and
   d_inner, fewer heads): each new shape autotunes mamba-ssm's kernels again on its first call (the chunk size and
   head dim are in their autotuning keys).
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

from benchmarks.measure import environment, free_memory, synchronize
from benchmarks.train_speed import ISSUE_MODEL, TINY_MODEL, bench, build_encoder, encoder_step, time_row
from training.train import TrainConfig
from vision_model.ops.backends import triton_chunk_scan

# coarse groups of kernel names, first match wins (names as cuBLAS/cuDNN/Triton/ATen give them)
KERNEL_GROUPS = (
    ("SSD chunk scan (mamba-ssm)", r"chunk|state_passing|bmm_chunk"),
    ("stem conv + BatchNorm (cuDNN/ATen)", r"batch_norm|bn_fw|bn_bw|welford|fprop|dgrad|wgrad|implicit|"
                                           r"nchwToNhwc|nhwcToNchw|conv2d|cudnn"),
    ("GEMM (cuBLAS)", r"gemm|nvjet|cutlass|xmma|matmul|aten::(add)?b?mm\b"),
    ("pre-norm / gated norm (mamba-ssm)", r"layer_norm|rms_norm|rmsnorm"),
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
    args = p.parse_args(argv)
    started = time.time()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs CUDA (or --device cpu --tiny to test the script)")
    if device.type == "cuda" and triton_chunk_scan() is None:
        raise SystemExit("needs mamba-ssm (pip install --no-deps the wheel from /work/shared/wheels)")
    spec = TINY_MODEL if args.tiny else ISSUE_MODEL
    chunks, headdims = ((8, 16), (32,)) if args.tiny else ((64, 128), (32, 64))
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
        for fusion in ("reorder_gather", "stem_channels_last"):  # no new kernel shapes: seconds each
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
