"""Issue 28 on the GPU: the one-chunk SSD scan (`vision_model.ops.ssd_short`) against mamba-ssm's chunked scan.

    python3 -m benchmarks.gpu.ssd_short_check --out $OUT --budget 420

Needs CUDA and mamba-ssm. Sections, cheapest and most important first (each row goes to $OUT/ssd_short.jsonl as soon
as it is measured; $OUT/summary.md is rewritten after every section; a hard deadline, --budget seconds from the
start, stops whatever runs):
1. correctness of ours, fp32 and bf16, at the issue-28, clip-art SSL and 35M-224px shapes (batch --check-batch):
   y and every gradient (x, dt, A, B, C, D, dt_bias) against autograd through `ssd_short_scan_ref` in float64:
   relative error (norm of the difference over the norm of the reference) and max abs error over max |reference|;
   the bf16 forward + backward repeated on the same inputs must be bit-identical (no atomics: a spread is a race).
2. fwd and fwd+bwd time of ours (default launch), bf16, at the four timing shapes (CUDA events, warm-up, median).
3. the issue-28 D training step (`benchmarks.train_speed.bench`, as `matsearch bench train` times it), D and D/8,
   with short_scan on.
4. mamba-ssm's `mamba_chunk_scan_combined` (chunk 256, the configs') at the four timing shapes: time, then its bf16
   errors at the check shapes against the same float64 reference and ours against it directly (its first calls
   autotune from a cold cache: minutes).
5. the training step with short_scan off (mamba-ssm's scan: `matsearch bench train --off short_scan`).
6. sweep of our launch parameters (BLOCK, HEADS, num_warps; fwd and bwd apart) at the issue shape, then the best
   few at the other timing shapes; each config's bf16 result is checked against the default launch's before it is
   timed. It runs in a child process (a faulting launch poisons the CUDA context), restarted after a crash.
7. mamba-ssm's fp32 errors at the check shapes (its fp32 kernels autotune anew).
`--variants default,factored,pairwise` runs sections 1 and 2 with more launches: the default ("ours": the forward
factors its diagonal tiles, the backward computes them pairwise), `FACTOR_DIAG` in both passes ("ours-factored") or
in neither ("ours-pairwise").
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.measure import environment, free_memory, measure, rel_error

# (name, batch, seqlen, heads, headdim, d_state)
TIMING_SHAPES = [("issue28 D", 1024, 145, 48, 16, 64), ("issue28 D/8", 1024, 145, 6, 16, 64),
                 ("clipart SSL", 4096, 37, 32, 16, 64), ("35M 224px", 128, 197, 64, 16, 128)]
CHECK_SHAPES = [TIMING_SHAPES[0], TIMING_SHAPES[2], TIMING_SHAPES[3]]
# --tiny (the script itself on CPU, in Triton's interpreter: tests/test_ssd_short.py)
TINY_SHAPES = [("tiny", 2, 19, 4, 8, 16), ("tiny short", 3, 5, 2, 16, 16)]
CHUNK = 256  # the configs' chunk_size: what training hands mamba-ssm
NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias")


class Deadline(Exception):
    pass


def _deadline(signum, frame):
    raise Deadline()


def make_inputs(b, l, h, p, n, dtype, device, seed=0):
    """Leaves shaped as the block hands them over: x, B, C views of one conv output (b, l, h·p + 2n), dt a view of a
    wider in_proj output; Mamba2's initialisation of A, D and dt_bias."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    xbc = (torch.randn(b, l, h * p + 2 * n, generator=g) * 0.7).to(device=device, dtype=dtype)
    zdt = (torch.randn(b, l, h + 8, generator=g) * 0.5).to(device=device, dtype=dtype)
    dt_init = torch.exp(torch.rand(h, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                        + torch.log(torch.tensor(1e-3)))
    dt_bias = (dt_init + torch.log(-torch.expm1(-dt_init))).to(device)
    A = -torch.empty(h).uniform_(1, 16, generator=g).to(device)
    D = torch.ones(h, device=device) + 0.1 * torch.randn(h, generator=g).to(device)
    dy = torch.randn(b, l, h, p, generator=g).to(device=device, dtype=dtype)
    return [xbc, zdt, A, D, dt_bias], dy


def scan_args(leaves, h, p, n):
    """(x, dt, A, B, C, D, dt_bias) from the leaves: views, as in the block."""
    xbc, zdt, A, D, dt_bias = leaves
    b, l = xbc.shape[:2]
    x = xbc[..., :h * p].view(b, l, h, p)
    B = xbc[..., h * p:h * p + n].view(b, l, 1, n)
    C = xbc[..., h * p + n:].view(b, l, 1, n)
    return x, zdt[..., :h], A, B, C, D, dt_bias


def grads_of(fn, leaves, dy, h, p, n):
    """y and the gradients of (x, dt, A, B, C, D, dt_bias) of fn(*scan_args)."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    args = scan_args(leaves, h, p, n)
    y = fn(*args)
    y.backward(dy.to(y.dtype))
    xbc, zdt, A, D, dt_bias = (t.grad for t in leaves)
    dx, dB, dC = xbc[..., :h * p], xbc[..., h * p:h * p + n], xbc[..., h * p + n:]
    return [y.detach(), dx, zdt[..., :h], A, dB, dC, D, dt_bias]


def errors(got, ref) -> dict:
    out = {}
    for name, a, r in zip(("y",) + NAMES, got, ref):
        a, r = a.double(), r.double()
        out[name] = {"rel": ((a - r).norm() / r.norm().clamp_min(1e-300)).item(),
                     "max": ((a - r).abs().max() / r.abs().max().clamp_min(1e-300)).item()}
    return out


def ours(fwd_config=None, bwd_config=None):
    from vision_model.ops.ssd_short import ssd_short_scan
    return lambda x, dt, A, B, C, D, dt_bias: ssd_short_scan(x, dt, A, B, C, D, dt_bias, fwd_config, bwd_config)


def variant(name: str, shape) -> tuple[str, object]:
    """(impl label, scan) of a --variants entry at a shape (name, batch, length, heads, head dim, d_state)."""
    if name == "default":
        return "ours", ours()
    if name in ("factored", "pairwise"):  # the diagonal tiles factored in both passes, or in neither
        from vision_model.ops.ssd_short import default_config
        _, _, l, h, p, _ = shape
        config = default_config(l, h, p, factor_diag=name == "factored")
        return f"ours-{name}", ours(config, config)
    raise ValueError(f"unknown variant {name!r}: default, factored or pairwise")


def reference(x, dt, A, B, C, D, dt_bias):
    from vision_model.ops.ssd_short import ssd_short_scan_ref
    return ssd_short_scan_ref(x, dt, A, B, C, D, dt_bias)


def mamba():
    from vision_model.ops.backends import triton_chunk_scan
    scan = triton_chunk_scan()
    return lambda x, dt, A, B, C, D, dt_bias: scan(x, dt, A, B, C, CHUNK, D=D, dt_bias=dt_bias, dt_softplus=True)


def timing_calls(fn, leaves, dy, h, p, n):
    """(forward as training runs it, forward + backward)."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]

    def fwd():
        return fn(*scan_args(leaves, h, p, n))

    def fwd_bwd():
        fwd().backward(dy)
    return fwd, fwd_bwd


def time_fn(fn, shape, device, repeats, dtype=torch.bfloat16) -> dict:
    name, b, l, h, p, n = shape
    leaves, dy = make_inputs(b, l, h, p, n, dtype, device)
    fwd, fwd_bwd = timing_calls(fn, leaves, dy, h, p, n)
    t_fwd = measure(fwd, device, warmup=2, repeats=repeats)
    t_all = measure(fwd_bwd, device, warmup=2, repeats=repeats)
    return {"fwd_ms": 1e3 * t_fwd.median_s, "fwd_bwd_ms": 1e3 * t_all.median_s,
            "first_call_s": t_fwd.warmup_s, "peak_mem_gib": (t_all.peak_mem_bytes or 0) / 2 ** 30}


# -- the sweep (child process) -------------------------------------------------------------------------------------

def sweep_configs(tiny: bool = False) -> list[tuple[str, dict]]:
    """(kind, config): forward and backward launches."""
    out = []
    grid = ((16, 32), (1, 4), (4,)) if tiny else ((16, 32, 64), (2, 4, 8), (4, 8))
    for block, heads, warps in itertools.product(*grid):
        cfg = {"BLOCK": block, "HEADS": heads, "num_warps": warps, "num_stages": 1}
        out += [("fwd", cfg), ("bwd", cfg)]
    return out


def sweep_child(args) -> None:
    """Times each (kind, config) of args.configs (a JSON list) at args.shape (JSON), one JSON line each on
    stdout."""
    from vision_model.ops.ssd_short import default_config, ssd_short_backward, ssd_short_forward
    device = torch.device(args.device)
    name, b, l, h, p, n = json.loads(args.shape)
    leaves, dy = make_inputs(b, l, h, p, n, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    x, dt, A, B, C, D, dt_bias = scan_args(leaves, h, p, n)
    base = default_config(l, h, p)
    y0 = ssd_short_forward(x, dt, A, B, C, D, dt_bias, base)
    g0 = ssd_short_backward(x, dt, A, B, C, D, dt_bias, dy, base)
    for kind, cfg in json.loads(args.configs):
        row = {"section": "sweep", "shape": name, "kind": kind, "config": cfg}
        try:
            if kind == "fwd":
                call = lambda: ssd_short_forward(x, dt, A, B, C, D, dt_bias, cfg)  # noqa: E731
                got, ref = [call()], [y0]
            else:
                call = lambda: ssd_short_backward(x, dt, A, B, C, D, dt_bias, dy, cfg)  # noqa: E731
                got, ref = list(call()), list(g0)
            # the same arithmetic in another tiling: bf16 rounding apart, it must agree with the default launch
            row["rel_vs_default"] = max(rel_error(a, r) for a, r in zip(got, ref))
            t = measure(call, device, warmup=2, repeats=args.repeats)
            row.update(ms=1e3 * t.median_s, first_call_s=t.warmup_s, status="ok")
        except Exception as exc:  # noqa: BLE001 - out of resources, compile errors: recorded, the sweep goes on
            row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:200]}")
        print(json.dumps(row), flush=True)


# -- the parent ----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=False)
    p.add_argument("--budget", type=float, default=420.0, help="hard deadline, seconds from the start")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per kernel timing (median)")
    p.add_argument("--check-batch", type=int, default=4, help="sequences per correctness check (float64 reference)")
    p.add_argument("--sections", default="1,2,3,4,5,6,7")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and model, no mamba-ssm: the script on CPU")
    p.add_argument("--check-shapes", default=None, help="section 1 at these shapes only, by name (comma-separated)")
    p.add_argument("--variants", default="default",
                   help="sections 1 and 2 with these launches: default, factored, pairwise")
    p.add_argument("--sweep-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--configs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sweep_child:
        sweep_child(args)
        return 0
    if args.out is None:
        p.error("--out is required")
    started = time.time()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs CUDA (or --device cpu --tiny to test the script)")
    from vision_model.ops.backends import triton_chunk_scan
    has_mamba = device.type == "cuda" and triton_chunk_scan() is not None
    if device.type == "cuda" and not has_mamba:
        raise SystemExit("needs mamba-ssm (pip install --no-deps the wheel from /work/shared/wheels)")
    timing_shapes, check_shapes = (TINY_SHAPES, TINY_SHAPES) if args.tiny else (TIMING_SHAPES, CHECK_SHAPES)
    if args.check_shapes:
        check_shapes = [s for s in check_shapes if s[0] in args.check_shapes.split(",")]
    sections = {int(s) for s in args.sections.split(",") if s}
    if not has_mamba:
        sections -= {4, 5, 7}
    args.out.mkdir(parents=True, exist_ok=True)
    log_path, summary_path = args.out / "ssd_short.jsonl", args.out / "summary.md"
    rows: list[dict] = []
    state = {"cut": None, "skipped": []}

    def add(row):
        row = {**row, "t_s": round(time.time() - started, 1)}
        rows.append(row)
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def left() -> float:
        return args.budget - (time.time() - started)

    def summarize():
        summary_path.write_text(format_summary(rows, state, time.time() - started))

    add({"section": "environment", **environment(device), "budget_s": args.budget})
    signal.signal(signal.SIGALRM, _deadline)
    signal.setitimer(signal.ITIMER_REAL, args.budget)
    try:
        if 1 in sections:
            for shape, var in itertools.product(check_shapes, args.variants.split(",")):
                name, _, l, h, pd, n = shape
                impl, fn = variant(var, shape)
                for dtype in (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,):
                    leaves, dy = make_inputs(args.check_batch, l, h, pd, n, dtype, device, seed=1)
                    t0 = time.time()
                    try:
                        got = grads_of(fn, leaves, dy, h, pd, n)
                        again = grads_of(fn, leaves, dy, h, pd, n)
                    except Exception as exc:  # noqa: BLE001 - a kernel that does not compile: recorded, go on
                        add({"section": "error", "impl": impl, "shape": name, "dtype": str(dtype)[6:],
                             "error": f"{type(exc).__name__}: {str(exc)[:2000]}"})
                        continue
                    ref = grads_of(reference, [t.double() for t in leaves], dy.double(), h, pd, n)
                    add({"section": "correctness", "impl": impl, "shape": name, "dtype": str(dtype)[6:],
                         "batch": args.check_batch, "errors": errors(got, ref),
                         "repeat_identical": all(torch.equal(a, b) for a, b in zip(got, again)),
                         "seconds": time.time() - t0})
                    del got, again, ref
                    free_memory()
            summarize()
        if 2 in sections:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter has no bf16
            for shape, var in itertools.product(timing_shapes, args.variants.split(",")):
                impl, fn = variant(var, shape)
                try:
                    add({"section": "kernel time", "impl": impl, "shape": shape[0], "batch": shape[1],
                         **time_fn(fn, shape, device, args.repeats, dtype)})
                except Exception as exc:  # noqa: BLE001
                    add({"section": "error", "impl": impl, "shape": shape[0],
                         "error": f"{type(exc).__name__}: {str(exc)[:2000]}"})
                free_memory()
            summarize()
        if 3 in sections:
            train_rows("short_scan on", {}, add, device, args.tiny)
            summarize()
        def mamba_errors(dtype):
            for shape in check_shapes:
                name, _, l, h, pd, n = shape
                leaves, dy = make_inputs(args.check_batch, l, h, pd, n, dtype, device, seed=1)
                theirs = grads_of(mamba(), leaves, dy, h, pd, n)
                ref = grads_of(reference, [t.double() for t in leaves], dy.double(), h, pd, n)
                add({"section": "correctness", "impl": "mamba-ssm", "shape": name, "dtype": str(dtype)[6:],
                     "batch": args.check_batch, "errors": errors(theirs, ref)})
                add({"section": "correctness", "impl": "ours vs mamba-ssm", "shape": name, "dtype": str(dtype)[6:],
                     "batch": args.check_batch, "errors": errors(grads_of(ours(), leaves, dy, h, pd, n), theirs)})
                free_memory()
            summarize()

        if 4 in sections:
            for shape in timing_shapes:
                add({"section": "kernel time", "impl": "mamba-ssm", "shape": shape[0], "batch": shape[1],
                     **time_fn(mamba(), shape, device, args.repeats)})
                free_memory()
            summarize()
            mamba_errors(torch.bfloat16)  # its bf16 kernels are tuned by now
        if 5 in sections:
            train_rows("short_scan off", {"short_scan": False}, add, device, args.tiny)
            summarize()
        if 6 in sections:
            run_sweep(args, timing_shapes, add, left, summarize)
        if 7 in sections:
            mamba_errors(torch.float32)  # last: its fp32 kernels autotune again
    except Deadline:
        state["cut"] = f"at {time.time() - started:.0f} s (budget {args.budget:.0f} s)"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    summarize()
    print(summary_path.read_text())
    return 0


def train_rows(label: str, off: dict, add, device, tiny: bool) -> None:
    """The issue-28 D and D/8 training steps (bf16, batch 1024) with the given fusions off."""
    from benchmarks.train_speed import ISSUE_MODEL, TINY_MODEL, bench
    model, batch = (TINY_MODEL, 2) if tiny else (ISSUE_MODEL, 1024)
    for row in bench(model, None, batch, (1,), [], [], device, off, forward=False, warmup=1, repeats=5,
                     log=lambda r: None, solo=(1, 8)):
        add({**row, "section": "train step", "label": label})
    free_memory()


def run_sweep(args, shapes, add, left, summarize) -> None:
    """Every sweep config at the first shape (the issue's), then its three best fwd and bwd configs and the default
    at the other shapes, each shape in a child process restarted after the config it died on."""
    from vision_model.ops.ssd_short import default_config
    first, seen_rows = shapes[0], []
    for shape in shapes:
        if shape is first:
            configs = sweep_configs(args.tiny)
        else:
            done = [r for r in seen_rows if r["shape"] == first[0] and r["status"] == "ok"
                    and r["rel_vs_default"] < 5e-2]
            configs = []
            for kind in ("fwd", "bwd"):
                best = sorted((r for r in done if r["kind"] == kind), key=lambda r: r["ms"])[:3]
                configs += [(kind, r["config"]) for r in best]
            base = default_config(shape[2], shape[3], shape[4])
            configs += [(kind, base) for kind in ("fwd", "bwd") if (kind, base) not in configs]
        todo = list(configs)
        while todo and left() > 10:
            cmd = [sys.executable, "-m", "benchmarks.gpu.ssd_short_check", "--sweep-child", "--shape",
                   json.dumps(shape), "--configs", json.dumps(todo), "--repeats", str(args.repeats),
                   "--device", args.device]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
            seen = 0
            try:
                for line in proc.stdout:
                    if not line.startswith("{"):
                        continue
                    row = json.loads(line)
                    seen_rows.append(row)
                    add(row)
                    seen += 1
                proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if proc.returncode != 0 and seen < len(todo):  # it died on todo[seen]: record it, go on after it
                add({"section": "sweep", "shape": shape[0], "kind": todo[seen][0], "config": todo[seen][1],
                     "status": f"child died (exit {proc.returncode})"})
                seen += 1
            todo = todo[seen:]
        summarize()


def format_summary(rows: list[dict], state: dict, seconds: float) -> str:
    lines = [f"# ssd_short_check: {seconds:.0f} s; cut by the deadline: {state['cut'] or 'no'}", ""]
    for r in rows:
        if r["section"] == "error":
            lines += [f"ERROR {r['impl']} at {r['shape']}: {r['error'][:300]}", ""]
    corr = [r for r in rows if r["section"] == "correctness"]
    if corr:
        lines += ["## correctness (rel = |a-ref|/|ref|, max = max|a-ref| / max|ref|)", "",
                  "| impl | shape | dtype | repeat identical | " + " | ".join(("y",) + NAMES) + " |",
                  "|---|---|---|---|" + "---|" * (1 + len(NAMES))]
        for r in corr:
            cells = [f"{r['errors'][k]['rel']:.1e} / {r['errors'][k]['max']:.1e}" for k in ("y",) + NAMES]
            lines.append(f"| {r['impl']} | {r['shape']} | {r['dtype']} | {r.get('repeat_identical', '')} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    kt = [r for r in rows if r["section"] == "kernel time"]
    if kt:
        lines += ["## kernel time, bf16 on CUDA (median ms)", "", "| shape | impl | fwd | fwd+bwd | first call s |",
                  "|---|---|---|---|---|"]
        for r in sorted(kt, key=lambda r: (r["shape"], r["impl"])):
            lines.append(f"| {r['shape']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                         f"{r['first_call_s']:.1f} |")
        lines.append("")
    tr = [r for r in rows if r["section"] == "train step"]
    if tr:
        lines += ["## training step (issue-28 config, bf16, batch 1024; --tiny: the two-layer model on CPU)", "",
                  "| fusion | level | step ms | img/s |",
                  "|---|---|---|---|"]
        for r in tr:
            if r.get("status") == "ok":
                lines.append(f"| {r['label']} | {r['row']} | {r['step_ms']:.1f} | {r['images_per_s']:,.0f} |")
            else:
                lines.append(f"| {r['label']} | {r['row']} | {r.get('status')} | |")
        lines.append("")
    sw = [r for r in rows if r["section"] == "sweep"]
    if sw:
        lines += ["## sweep (bf16 on CUDA; ms of one fwd or one bwd call)", "",
                  "| shape | kind | BLOCK | HEADS | warps | ms | rel vs default | status |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(sw, key=lambda r: (r["shape"], r["kind"], r.get("ms", 1e9))):
            c = r["config"]
            ms = f"{r['ms']:.3f}" if "ms" in r else ""
            rel = f"{r['rel_vs_default']:.1e}" if "rel_vs_default" in r else ""
            lines.append(f"| {r['shape']} | {r['kind']} | {c['BLOCK']} | {c['HEADS']} | {c.get('num_warps')} | {ms} "
                         f"| {rel} | {r['status']} |")
        for shape in dict.fromkeys(r["shape"] for r in sw):
            for kind in ("fwd", "bwd"):
                ok = [r for r in sw if r["shape"] == shape and r["kind"] == kind and r["status"] == "ok"]
                if ok:
                    best = min(ok, key=lambda r: r["ms"])
                    lines.append(f"\nbest {kind} at {shape}: {best['config']} {best['ms']:.3f} ms")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
