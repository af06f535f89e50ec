"""`matsearch bench`: encoder throughput, latency, memory and FLOPs vs resolution, MatMamba-Vision vs ViT.

    matsearch bench --device cuda --out runs/bench            # bf16, 224..2048 px, all models in one process
    matsearch bench --device cpu --out runs/bench_cpu         # fp32, 224 and 384 px, batch 1 and up to 4
    matsearch bench --quick --out /tmp/bench                     # tiny two-layer models: a smoke test
    matsearch bench --merge runs/a runs/b --out runs/ab          # one report from several runs

For every model, resolution and setting (trained level or Mix'n'Match preset) it records a `throughput` row (the
largest power-of-two batch that fits, capped by --max-batch and --max-tokens) and a `latency` row (batch 1).
Settings at one resolution run widest first; the batch that fitted the widest is where narrower ones start.
See benchmarks/README.md for the method and the columns.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from vision_model.device import resolve_device
from vision_model.graphs import capture_cuda_graph

from . import report
from .measure import (GIB, Timing, environment, free_memory, is_out_of_memory, matmul_tflops, measure,
                      run_unless_oom, synchronize)
from .models import (ModelSpec, Setting, build_model, encoder_call, flops_per_image, in_chans, parse_model_spec,
                     parse_setting_names, patch_size, settings_for)

# cheapest first: if --time-budget runs out, it cuts the 135M's last points, not a baseline
GPU_MODELS = ["vit_small_patch16_224", "vit_base_patch16_224", "matmamba_vision_35m", "matmamba_vision_135m"]
GPU_LEVELS = ["1", "2", "4", "8", "mnm-half", "mnm-taper"]
GPU_RESOLUTIONS = [224, 384, 512, 768, 1024, 1536, 2048]
CPU_LEVELS = ["1", "2", "4", "8"]
CPU_RESOLUTIONS = [224, 384]
# --quick: two-layer models at thumbnail sizes; seconds on a CPU, a smoke test of the whole path on a GPU
QUICK_MODELS = ["matmamba_vision_35m:depth=2", "vit_small_patch16_224:depth=2"]
QUICK_LEVELS = ["1", "8", "mnm-half"]
QUICK_RESOLUTIONS = [32, 64]

# per device: (repeats, warmup, max batch, seconds per point)
DEFAULTS = {"cuda": (10, 3, 256, 1.0), "cpu": (3, 1, 4, 2.0)}
QUICK_DEFAULTS = (2, 1, 2, 0.5)
# Batch cap in patch tokens per call (batch x patches): 256 images at 224 px, 4 at 2048 px.  Past this the GPU is
# already full, and a bigger batch would only lengthen the run.
MAX_TOKENS = 65536


# -- command line -------------------------------------------------------------------------------------------------


def _split(values: list[str] | None) -> list[str] | None:
    """Accept both `--x a b` and `--x a,b`."""
    if values is None:
        return None
    return [v for item in values for v in item.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cuda: bf16 weights and inputs; cpu: fp32 and a smaller default set (default: auto)")
    parser.add_argument("--models", nargs="+", metavar="NAME[:key=value...]",
                        help=f"MatMamba configs or timm names, with optional config overrides (default GPU: "
                             f"{' '.join(GPU_MODELS)})")
    parser.add_argument("--levels", nargs="+", metavar="LEVEL",
                        help="trained levels and Mix'n'Match presets mnm-half, mnm-taper (default GPU: "
                             f"{' '.join(GPU_LEVELS)}; CPU: {' '.join(CPU_LEVELS)})")
    parser.add_argument("--resolutions", nargs="+", metavar="PX",
                        help=f"square input sizes (default GPU: {GPU_RESOLUTIONS}; CPU: {CPU_RESOLUTIONS})")
    parser.add_argument("--repeats", type=int, help="timed calls per point; the median is reported "
                                                    "(default GPU 10, CPU 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls per point, the first of which autotunes "
                                                   "(default GPU 3, CPU 1)")
    parser.add_argument("--max-batch", type=int, help="largest throughput batch (default GPU 256, CPU 4)")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                        help=f"cap on batch x patches per throughput call (default {MAX_TOKENS})")
    parser.add_argument("--seconds-per-point", type=float,
                        help="shrink repeats (to no fewer than 3) where calls are slow (default GPU 1, CPU 2)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="start no new point after this many seconds; the rest are recorded as skipped")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"),
                        help="writes bench.json, bench.md and *.png here (default runs/bench)")
    parser.add_argument("--quick", action="store_true", help="two-layer models at 32 and 64 px: a smoke test")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay every timed call (throughput and batch-1 latency, all models alike) as a CUDA "
                             "graph: no host launch overhead; falls back to eager where capture fails")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each encoder, experimental (every new shape compiles, untimed: a much "
                             "longer run; MatMamba graph-breaks at its weight cache and the mamba-ssm kernels)")
    parser.add_argument("--ssd-backend", choices=("auto", "torch", "triton"), default="auto",
                        help="MatMamba SSD kernels (default auto: mamba-ssm Triton on CUDA when installed)")
    parser.add_argument("--eval-json", type=Path,
                        help="retrieval eval JSON (records with setting, top1, query_mflops) for accuracy_vs_cost.png")
    parser.add_argument("--eval-model", metavar="NAME",
                        help="bench model whose throughput the accuracy plot pairs with the eval's settings "
                             "(default: the first MatMamba model measured)")
    parser.add_argument("--eval-resolution", type=int, metavar="PX",
                        help="resolution of that pairing (default: the model's smallest measured)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="DIR",
                        help="no measuring: combine the bench.json of these run directories into one report")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, with batch caps and FLOPs")
    parser.add_argument("--debug", action="store_true", help="full tracebacks")


@dataclass
class Plan:
    device: torch.device
    dtype: torch.dtype
    models: list[ModelSpec]
    levels: list[str | int]
    resolutions: list[int]
    repeats: int
    warmup: int
    max_batch: int
    max_tokens: int
    seconds_per_point: float
    cuda_graphs: bool
    compile: bool
    ssd_backend: str
    deadline: float | None  # time.monotonic() after which no new point starts

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def describe(self) -> dict:
        return {"dtype": str(self.dtype).replace("torch.", ""), "models": [m.label for m in self.models],
                "levels": [str(v) for v in self.levels], "resolutions": self.resolutions, "repeats": self.repeats,
                "warmup": self.warmup, "max_batch": self.max_batch, "max_tokens": self.max_tokens,
                "seconds_per_point": self.seconds_per_point, "cuda_graphs": self.cuda_graphs,
                "compile": self.compile, "ssd_backend": self.ssd_backend}


def make_plan(args: argparse.Namespace) -> Plan:
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available() and not args.dry_run:  # a dry run only plans
        raise RuntimeError("--device cuda but CUDA is not available")
    on_gpu = device.type == "cuda"
    if args.quick:
        models, levels, resolutions, defaults = QUICK_MODELS, QUICK_LEVELS, QUICK_RESOLUTIONS, QUICK_DEFAULTS
    else:
        models = GPU_MODELS
        levels, resolutions = (GPU_LEVELS, GPU_RESOLUTIONS) if on_gpu else (CPU_LEVELS, CPU_RESOLUTIONS)
        defaults = DEFAULTS[device.type]
    repeats, warmup, max_batch, seconds_per_point = defaults
    pick = lambda given, default: default if given is None else given
    plan = Plan(
        device=device, dtype=torch.bfloat16 if on_gpu else torch.float32,
        models=[parse_model_spec(m) for m in pick(_split(args.models), models)],
        levels=[parse_setting_names(v) for v in pick(_split(args.levels), levels)],
        resolutions=[int(r) for r in pick(_split(args.resolutions), resolutions)],
        # compiled MatMamba recompiles once on its second call (its nested-weight cache fills on the first)
        repeats=pick(args.repeats, repeats), warmup=max(pick(args.warmup, warmup), 3 if args.compile else 0),
        max_batch=pick(args.max_batch, max_batch), max_tokens=args.max_tokens,
        seconds_per_point=pick(args.seconds_per_point, seconds_per_point),
        cuda_graphs=args.cuda_graphs and on_gpu, compile=args.compile, ssd_backend=args.ssd_backend,
        deadline=None if args.time_budget is None else time.monotonic() + args.time_budget)
    if plan.repeats < 1 or plan.max_batch < 1 or plan.max_tokens < 1:
        raise ValueError("--repeats, --max-batch and --max-tokens must be positive")
    return plan


# -- one point: a model, a setting, a resolution, a batch ----------------------------------------------------------


def batch_cap(plan: Plan, patches: int) -> int:
    """Largest power of two within both --max-batch and --max-tokens at this many patches per image."""
    cap = max(1, min(plan.max_batch, plan.max_tokens // patches))
    return 1 << (cap.bit_length() - 1)


def _images(model, resolution: int, batch: int, plan: Plan) -> torch.Tensor:
    return torch.randn(batch, in_chans(model), resolution, resolution, device=plan.device, dtype=plan.dtype)


def time_batch(fn: Callable, model, resolution: int, batch: int, plan: Plan) -> Timing:
    x = _images(model, resolution, batch, plan)
    return measure(lambda: fn(x), plan.device, plan.warmup, plan.repeats, plan.seconds_per_point)


def time_batch_graphed(fn: Callable, model, resolution: int, batch: int, plan: Plan) -> tuple[Timing, str | None]:
    """The batch replayed as one CUDA graph (no per-kernel launch cost on the host); (eager timing, why) when capture
    fails for a reason other than memory (out of memory propagates, so the caller halves the batch)."""
    x = _images(model, resolution, batch, plan)
    for _ in range(max(plan.warmup, 1)):  # autotuning must be over before capture
        fn(x)
    if plan.device.type == "cuda":  # replays allocate nothing: the activations live in the pool made at capture
        torch.cuda.reset_peak_memory_stats(plan.device)
    try:
        replay = capture_cuda_graph(fn, x)
    except Exception as exc:  # noqa: BLE001 - any other capture failure means: time it eagerly instead
        synchronize(plan.device)
        if is_out_of_memory(exc):
            raise
        reason = f"CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:120]}); eager"
        return measure(lambda: fn(x), plan.device, 1, plan.repeats, plan.seconds_per_point), reason
    capture_peak = torch.cuda.max_memory_allocated(plan.device) if plan.device.type == "cuda" else None
    timing = measure(replay, plan.device, 1, plan.repeats, plan.seconds_per_point)
    if capture_peak is not None:
        timing.peak_mem_bytes = max(timing.peak_mem_bytes or 0, capture_peak)
    return timing, None


def largest_batch_timing(run_batch: Callable[[int], Timing], start: int) -> tuple[int | None, Timing | None, list]:
    """Time at `start`, halving on out-of-memory: (batch, timing, [(batch, error) for each OOM])."""
    ooms = []
    batch = start
    while batch >= 1:
        timing, error = run_unless_oom(lambda: run_batch(batch))
        if timing is not None:
            return batch, timing, ooms
        ooms.append((batch, error))
        batch //= 2
    return None, None, ooms


@dataclass(frozen=True)
class Point:
    """What one pair of rows measures: a model's setting at one resolution."""
    spec: ModelSpec
    setting: Setting
    resolution: int
    gflops: float | None  # per image, analytic

    def row(self, mode: str, batch: int | None, timing: Timing | None = None, status: str = "ok",
            note: str | None = None, cuda_graph: bool = False) -> dict:
        median = timing.median_s if timing else None
        images_per_s = batch / median if timing and batch and median > 0 else None
        return {
            "model": self.spec.label, "setting": self.setting.label, "level": self.setting.level,
            "widths": list(self.setting.widths) if self.setting.widths else None, "resolution": self.resolution,
            "batch": batch, "mode": mode, "status": status, "images_per_s": images_per_s,
            "latency_ms": median * 1e3 if timing else None,
            "peak_mem_gib": timing.peak_mem_bytes / GIB if timing and timing.peak_mem_bytes is not None else None,
            "gflops_per_image": self.gflops, "achieved_tflops": report.achieved_tflops(self.gflops, images_per_s),
            "repeats": len(timing.seconds) if timing else 0, "warmup_s": round(timing.warmup_s, 3) if timing else None,
            "cuda_graph": cuda_graph, "note": note,
        }


def _oom_note(ooms: list) -> str | None:
    if not ooms:
        return None
    return "out of memory at batch " + ", ".join(str(b) for b, _ in ooms) + f" ({ooms[-1][1]})"


def _timed_row(point: Point, fn: Callable, model, batch: int, plan: Plan):
    """(timing, note, graphed) for one batch: replayed as a CUDA graph with --cuda-graphs, else eager."""
    if plan.cuda_graphs:
        timing, fallback = time_batch_graphed(fn, model, point.resolution, batch, plan)
        return timing, fallback, fallback is None
    return time_batch(fn, model, point.resolution, batch, plan), None, False


def throughput_row(point: Point, fn: Callable, model, start_batch: int, plan: Plan) -> dict:
    batch, result, ooms = largest_batch_timing(lambda b: _timed_row(point, fn, model, b, plan),
                                               start_batch)
    if result is None:
        return point.row("throughput", 1, status="oom", note=_oom_note(ooms))
    timing, fallback, graphed = result
    note = "; ".join(n for n in (_oom_note(ooms), fallback) if n) or None
    return point.row("throughput", batch, timing, note=note, cuda_graph=graphed)


def latency_row(point: Point, fn: Callable, model, plan: Plan) -> dict:
    result, error = run_unless_oom(lambda: _timed_row(point, fn, model, 1, plan))
    if result is None:
        return point.row("latency", 1, status="oom", note=error)
    timing, fallback, graphed = result
    return point.row("latency", 1, timing, note=fallback, cuda_graph=graphed)


# -- one model over every resolution ------------------------------------------------------------------------------


def encoder_for(model, setting: Setting, plan: Plan) -> Callable:
    fn = encoder_call(model, setting)
    if plan.compile:
        # every (setting, shape) is its own graph; the default limit of 8 would silently fall back to eager
        dynamo = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, limit, max(getattr(dynamo, limit), 512))
        fn = torch.compile(fn, dynamic=False)
    return fn


def bench_model(spec: ModelSpec, plan: Plan, rows: list[dict], log: Callable[[dict], None]) -> None:
    model = build_model(spec, plan.device, plan.dtype, plan.ssd_backend)
    settings = settings_for(model, plan.levels)
    encoders = {s: encoder_for(model, s, plan) for s in settings}
    with torch.inference_mode():  # entered after building: weights made in inference mode would be inference tensors
        _bench_resolutions(model, spec, settings, encoders, plan, rows, log)
    del model, encoders
    free_memory()


def _bench_resolutions(model, spec: ModelSpec, settings, encoders, plan: Plan, rows: list, log: Callable) -> None:
    p = patch_size(model)
    too_big: set[str] = set()  # settings whose batch 1 ran out of memory: larger resolutions cannot fit either
    for resolution in plan.resolutions:
        points = [Point(spec, s, resolution, _gflops(model, s, resolution)) for s in settings]
        start_batch = batch_cap(plan, (resolution // p) ** 2)
        for point in sorted(points, key=lambda pt: -(pt.gflops or 0)):  # widest first: it sets the batch
            skip = _skip_reason(point, p, too_big, plan)
            if skip:
                new = [point.row(mode, None, status="skipped", note=skip) for mode in ("throughput", "latency")]
            else:
                new = bench_point(point, encoders[point.setting], model, start_batch, plan)
                if new[0]["status"] == "ok":
                    start_batch = new[0]["batch"]  # narrower settings need no more memory per image
                else:
                    too_big.add(point.setting.label)
            for row in new:
                rows.append(row)
                log(row)
        free_memory()


def bench_point(point: Point, fn: Callable, model, start_batch: int, plan: Plan) -> list[dict]:
    """The throughput row, then (if batch 1 fits at all) the batch-1 latency row."""
    thr = throughput_row(point, fn, model, start_batch, plan)
    if thr["status"] != "ok":
        return [thr, point.row("latency", 1, status="oom", note="batch 1 already ran out of memory above")]
    return [thr, latency_row(point, fn, model, plan)]


def _gflops(model, setting: Setting, resolution: int) -> float | None:
    flops = flops_per_image(model, setting, resolution)
    return None if flops is None else flops / 1e9


def _skip_reason(point: Point, patch: int, too_big: set[str], plan: Plan) -> str | None:
    if point.resolution % patch:
        return f"{point.resolution} px is not a multiple of the patch size {patch}"
    if point.setting.label in too_big:
        return "batch 1 ran out of memory at a smaller resolution"
    if plan.out_of_time():
        return "time budget spent"
    return None


# -- entry point --------------------------------------------------------------------------------------------------


def print_row(row: dict) -> None:
    if row["status"] != "ok":
        print(f"{row['model']:<32} {row['setting']:<10} {row['resolution']:>5}px {row['mode']:<10} "
              f"{row['status']}: {row['note']}", flush=True)
        return
    mem = "" if row["peak_mem_gib"] is None else f" {row['peak_mem_gib']:.2f} GiB"
    tflops = "" if row["achieved_tflops"] is None else f" {row['achieved_tflops']:.3g} TFLOP/s"
    print(f"{row['model']:<32} {row['setting']:<10} {row['resolution']:>5}px {row['mode']:<10} "
          f"b={row['batch']:<4} {row['images_per_s']:10.1f} img/s {row['latency_ms']:9.2f} ms{mem}{tflops}",
          flush=True)


def dry_run(plan: Plan) -> int:
    print(f"{'model':<32} {'setting':<10} {'res':>5} {'batch cap':>9} {'GFLOPs/img':>11}")
    for spec in plan.models:
        model = build_model(spec, torch.device("cpu"), torch.float32, "torch")
        for resolution in plan.resolutions:
            cap = batch_cap(plan, (resolution // patch_size(model)) ** 2)
            for setting in settings_for(model, plan.levels):
                gflops = _gflops(model, setting, resolution)
                print(f"{spec.label:<32} {setting.label:<10} {resolution:>5} {cap:>9} "
                      f"{'' if gflops is None else f'{gflops:11.1f}'}")
        del model
    return 0


def merge(dirs: list[Path], args: argparse.Namespace) -> int:
    runs = [report.read_json(d / "bench.json") for d in dirs]
    meta = {**runs[0][0], "merged_from": [{"dir": str(d), **m} for d, (m, _) in zip(dirs, runs)]}
    rows = [row for _, run_rows in runs for row in run_rows]
    for path in report.write_reports(args.out, meta, rows, *_eval_args(args)):
        print(f"wrote {path}")
    return 0


def _eval_args(args: argparse.Namespace) -> tuple:
    if args.eval_json is not None and not args.eval_json.exists():
        print(f"note: --eval-json {args.eval_json} does not exist; no accuracy plot")
        return None, None, None
    return args.eval_json, args.eval_model, args.eval_resolution


def run(args: argparse.Namespace) -> int:
    if args.merge:
        return merge(args.merge, args)
    plan = make_plan(args)
    if args.dry_run:
        return dry_run(plan)
    if plan.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # conv algorithms chosen during warm-up, per shape
    meta = {**environment(plan.device), **plan.describe(), "ssd_backend_used": _ssd_backend_used(plan)}
    if plan.device.type == "cuda":
        meta["matmul_tflops"] = round(matmul_tflops(plan.device, plan.dtype), 1)
    if plan.device.type == "cuda" and meta["ssd_backend_used"] == "torch":
        print("warning: MatMamba runs the PyTorch SSD on CUDA (mamba-ssm not importable?): slower, and its T x T "
              "chunk matrices need far more memory than the Triton kernels", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    started = time.monotonic()

    def log(row: dict) -> None:
        print_row(row)
        report.write_json(args.out / "bench.json", meta, rows)  # a killed run still leaves every finished row

    for spec in plan.models:
        bench_model(spec, plan, rows, log)
    meta["wall_s"] = round(time.monotonic() - started, 1)
    for path in report.write_reports(args.out, meta, rows, *_eval_args(args)):
        print(f"wrote {path}")
    return 0


def _ssd_backend_used(plan: Plan) -> str | None:
    if not any(spec.is_matmamba for spec in plan.models):
        return None
    from vision_model.ops.backends import resolve_backend
    return resolve_backend(plan.ssd_backend, plan.device)


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.resolution ...`: the same command without the matsearch entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.resolution", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
