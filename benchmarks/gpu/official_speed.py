"""The paper's shapes at inference (issue 21): verify the several-heads SSD forward, then images/s against the
official code and ViT-B/16.

    python3 -m benchmarks.gpu.official_speed --budget 520 --out $OUT        # H200, one command (~9 min)
    python3 -m benchmarks.gpu.official_speed --smoke --out /tmp/os         # CPU: Triton's interpreter, tiny shapes

From a cold Triton cache prefix `MAMBA_DETERMINISTIC=1 TRITON_CACHE_AUTOTUNING=0`: mamba-ssm (the yardstick of the
checks and timings) then compiles one configuration a kernel instead of autotuning for minutes in each candidate's
process, which took the whole verification budget on the H200 (docs/notes.md 18.13).

(a) Verification. Each candidate launch of `vision_model.ops.ssd_triton`'s several-heads kernel (head dim 32 with
d_state 128: the 135M; head dim 16: the 35M; now with 32-token chunks, the launches with 64-token chunks being
verified and committed) runs in a process of its own (a launch that faults poisons the CUDA context) on the encoders'
own calls: 224, 1024 (4097 tokens) and 2048 px (16385 tokens), D and D/8 head counts, a few batch sizes, odd lengths
and head counts, dt scaled per row. Against `ssd_minimal` in float64 and mamba-ssm's `mamba_chunk_scan_combined`: fp32
(true fp32 dots) within 1e-4 of float64; bf16 within max(2x mamba-ssm's own bf16 error on the same inputs, 5e-3);
every repeat bit-identical (the compiler race of docs/notes.md section 11 showed as run-to-run changes); all finite.
Then (in this process) the scan alone, bf16, at each level's head count: ours (launches that passed) against the
committed launch and mamba-ssm (ms).
A PASS/FAIL table is printed with the line to put in `ssd_triton.VERIFIED_MULTIHEAD`.

(b) Speed, bf16 images/s (`embed`, batch 128 / 16 / 4 at 224 / 1024 / 2048 px): our 135M and 35M at D, D/2, D/4, D/8
with this run's passed launches added to the verified set (new) and with the current path (the committed
`VERIFIED_MULTIHEAD`; mamba-ssm's scan for head shapes with no verified launch), the official code (found as
`benchmarks.gpu.official_parity` finds it, and built by its helpers) and timm ViT-B/16. 1024 px first, and at each
size ViT, then per model the new path, the official code, the current path: rows past --budget are recorded as
skipped. At 1024 px the CUDA kernels of one 135M call at D/4 and at D/8 (`--profile-models`, `--profile-levels`) are
profiled on both paths (profile.txt): why the current path ran D/8 slower than D/4 (docs/notes.md 18.4); and each
model's features at D and D/8 with the new kernel are compared with the current path's (relative difference, bf16).

Writes into --out: official_speed.json (everything), official_speed.md (tables), verify.jsonl (one line per
check), profile.txt. Needs CUDA with mamba-ssm installed (PYTHONPATH), or --smoke on a CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# (headdim, d_state, heads a program, chunk length): the paper's 135M and 35M head shapes, each a 64-wide block of x
# columns; 64-token chunks passed on the H200 and are committed, 32-token ones timed faster there and are next
CANDIDATES = [(32, 128, 2, 32), (16, 128, 4, 32)]
# (batch, seqlen, heads, dt scaled per row): the encoders' own calls (both presets have 64 heads at D, 8 at D/8) and
# odd ones: a ragged last chunk, a head count that leaves the last program half empty
GPU_CASES = [(16, 4097, 64, False), (16, 4097, 8, False), (16, 4097, 16, True), (2, 16385, 64, False),
             (1, 16385, 8, False), (128, 197, 64, False), (1, 197, 8, False), (3, 1000, 6, True)]
SMOKE_CASES = [(1, 70, 4, False), (2, 37, 3, True)]
# scan-only timing: (batch, seqlen) of 1024 and 2048 px at each level's head count
TIMED = [(16, 4097), (4, 16385)]
LEVEL_HEADS = {1: 64, 2: 32, 4: 16, 8: 8}
SMOKE_TIMED, SMOKE_LEVEL_HEADS = [(1, 70)], {1: 4, 8: 2}
REPEATS = 3
FP32_TOL, BF16_FLOOR = 1e-4, 5e-3
MODEL_CHUNK = 256  # the presets' chunk_size: what mamba-ssm's scan runs with in the model

MODELS = {"135m": dict(name="matmamba_vision_135m", official=dict(d_model=1024, n_layer=20)),
          "35m": dict(name="matmamba_vision_35m", official=dict(d_model=512, n_layer=20)),
          # not the paper's (RMSNorm, head dim 64: the one-head kernel): a yardstick, --models 135m,35m,135m-fast
          "135m-fast": dict(name="matmamba_vision_135m_fast", official=None)}
# --smoke: two-layer models at 32 px keep each preset's head dim (32 / 16) and d_state 128
# (D/8 of d_model 256 is 2 heads of 32; of d_model 128, 2 heads of 16)
SMOKE_MODELS = {"135m": dict(d_model=256, depth=2, patch_size=16), "35m": dict(d_model=128, depth=2, patch_size=16),
                "135m-fast": dict(d_model=256, depth=2, patch_size=16)}
BATCH = {224: 128, 1024: 16, 2048: 4}
SMOKE_BATCH = {32: 2, 48: 1}


def log(*parts) -> None:
    print(*parts, flush=True)


# -- (a) verification, one process per candidate -------------------------------------------------------------------


def make_inputs(batch, seqlen, heads, headdim, d_state, device, scaled, seed=0):
    """x, dt, A, B, C, D, dt_bias, dt_scale as the block passes them: views of one in_proj row, Mamba2's dt init."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    inner = heads * headdim
    row = torch.randn(batch, seqlen, 2 * inner + 2 * d_state + heads, device=device, generator=g)
    x = row[..., inner:2 * inner].unflatten(-1, (heads, headdim))
    B = row[..., 2 * inner:2 * inner + d_state].unsqueeze(2)
    C = row[..., 2 * inner + d_state:2 * inner + 2 * d_state].unsqueeze(2)
    dt = row[..., 2 * inner + 2 * d_state:]
    u = torch.rand(heads, device=device, generator=g)
    dt_init = torch.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt_bias = dt_init + torch.log(-torch.expm1(-dt_init))
    A = -(1 + 15 * torch.rand(heads, device=device, generator=g))
    D = 1 + 0.3 * torch.randn(heads, device=device, generator=g)
    scale = torch.rand(batch, seqlen, device=device, generator=g) + 0.5 if scaled else None
    return row, x, dt, A, B, C, D, dt_bias, scale


def verify_candidate(key: tuple[int, int, int, int], smoke: bool) -> None:
    """Every case of one candidate: JSON lines on stdout (a "starting" line on stderr first, so a fault names it)."""
    import torch
    import torch.nn.functional as F

    from vision_model.ops.backends import triton_chunk_scan
    from vision_model.ops.ssd_minimal import ssd_chunked
    from vision_model.ops.ssd_triton import launch_config, ssd_forward_triton
    headdim, d_state, heads_per_program, chunk = key
    device = "cpu" if smoke else "cuda"
    mamba = triton_chunk_scan()
    rel = lambda y, ref: ((y.double() - ref).norm() / ref.norm()).item()
    dtypes = ["fp32"] if smoke else ["fp32", "bf16"]  # the interpreter has no bfloat16 (section 11)
    for case in (SMOKE_CASES if smoke else GPU_CASES):
        b, l, h, scaled = case
        name = f"b{b} L{l} h{h}" + (" dt_scale" if scaled else "")
        print(json.dumps({"key": key, "case": name, "starting": True}), file=sys.stderr, flush=True)
        row, x, dt, A, B, C, D, dt_bias, scale = make_inputs(b, l, h, headdim, d_state, device, scaled)
        dt_eff = dt if scale is None else dt * scale[..., None]
        ref = ssd_chunked(*(v.double() for v in (x, F.softplus(dt_eff + dt_bias), A, B, C, D)), chunk_size=64)
        config = dict(launch_config(b, h, headdim, d_state, l, x.device), HEADS=heads_per_program, CHUNK=chunk)
        if smoke:
            config["CHUNK"] = 16  # several chunks and segments even at interpreter lengths
            config["segments"] = 2
        out = {"key": list(key), "case": name, "config": config}
        for label in dtypes:
            dtype = torch.float32 if label == "fp32" else torch.bfloat16
            row_d = row.to(dtype)
            inner = h * headdim
            xv = row_d[..., inner:2 * inner].unflatten(-1, (h, headdim))
            Bv = row_d[..., 2 * inner:2 * inner + d_state].unsqueeze(2)
            Cv = row_d[..., 2 * inner + d_state:2 * inner + 2 * d_state].unsqueeze(2)
            dtv = row_d[..., 2 * inner + 2 * d_state:]
            ys = [ssd_forward_triton(xv, dtv, A, Bv, Cv, D, dt_bias, dt_scale=scale, config=dict(config),
                                     unverified=True) for _ in range(REPEATS if label == "bf16" or not smoke else 2)]
            out[f"{label}_err"] = rel(ys[0], ref)
            out[f"{label}_repeat_equal"] = all(torch.equal(ys[0], y) for y in ys[1:])
            out[f"{label}_finite"] = bool(torch.isfinite(ys[0]).all())
            if mamba is not None:
                dtm = dtv if scale is None else (dtv.float() * scale[..., None]).to(dtv.dtype)
                ym = mamba(xv, dtm, A, Bv, Cv, MODEL_CHUNK, D=D, dt_bias=dt_bias, dt_softplus=True)
                out[f"{label}_mamba_err"] = rel(ym, ref)
                out[f"{label}_vs_mamba"] = rel(ys[0].double(), ym.double())
            del ys
        ok = all(out[f"{p}_repeat_equal"] and out[f"{p}_finite"] for p in dtypes) and out["fp32_err"] <= FP32_TOL
        if "bf16" in dtypes:
            out["bf16_tol"] = max(2 * out.get("bf16_mamba_err", 0.0), BF16_FLOOR)
            ok = ok and out["bf16_err"] <= out["bf16_tol"]
        out["ok"] = ok
        print(json.dumps(out), flush=True)
        del row, x, dt, B, C, ref
        if not smoke:
            torch.cuda.empty_cache()


def _wall_ms(fn, return_mode="median") -> float:
    """--smoke's stand-in for triton.testing.do_bench (CUDA only): one call's wall time."""
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def scan_timings(passed: set, deadline: float, smoke: bool = False) -> list[dict]:
    """The scan alone, bf16, median ms, at each level's head count of the 1024 and 2048 px calls: ours (launches
    that passed) against mamba-ssm's chunked scan at the presets' chunk length; at 1024 px also the committed launch
    (`launch_config`'s, what inference runs today) and one not yet verified (twice the segments), for the next
    round."""
    import torch

    from vision_model.ops.backends import triton_chunk_scan
    from vision_model.ops.ssd_triton import launch_config, ssd_forward_triton
    if smoke:
        do_bench, timed, level_heads, device, dtype = _wall_ms, SMOKE_TIMED, SMOKE_LEVEL_HEADS, "cpu", torch.float32
    else:
        from triton.testing import do_bench
        timed, level_heads, device, dtype = TIMED, LEVEL_HEADS, "cuda", torch.bfloat16
    mamba, rows = triton_chunk_scan(), []
    for key in CANDIDATES:
        headdim, d_state, heads_per_program, chunk = key
        for b, l in timed:
            for level, h in level_heads.items():
                if time.time() > deadline:
                    return rows
                _, x, dt, A, B, C, D, dt_bias, _ = make_inputs(b, l, h, headdim, d_state, device, False)
                x, dt, B, C = (v.to(dtype) for v in (x, dt, B, C))
                current = launch_config(b, h, headdim, d_state, l, x.device)
                config = dict(current, HEADS=heads_per_program, CHUNK=chunk)
                row = {"key": list(key), "timed": f"b{b} L{l}", "level": level, "heads": h,
                       "segments": config["segments"]}
                if key in passed:
                    ours = lambda cfg=config: ssd_forward_triton(x, dt, A, B, C, D, dt_bias, config=dict(cfg),
                                                                 unverified=True)
                    row["ours_ms"] = do_bench(ours, return_mode="median")
                    if (b, l) == timed[0]:  # today's launch, and an untried one (y compared)
                        y = ours()
                        for name, variant in (("current", current),
                                              ("segments_x2", dict(config, segments=2 * config["segments"]))):
                            try:
                                row[f"{name}_ms"] = do_bench(lambda v=variant: ours(v), return_mode="median")
                                row[f"{name}_rel_diff"] = ((ours(variant).float() - y.float()).norm()
                                                           / y.float().norm()).item()
                            except Exception as exc:  # noqa: BLE001 - context only
                                row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                if mamba is not None:
                    row["mamba_ms"] = do_bench(lambda: mamba(x, dt, A, B, C, MODEL_CHUNK, D=D, dt_bias=dt_bias,
                                                             dt_softplus=True), return_mode="median")
                rows.append(row)
                log(json.dumps(row))
                del x, dt, B, C
                if not smoke:
                    torch.cuda.empty_cache()
    return rows


def run_verification(smoke: bool, deadline: float, out_lines: list[str]) -> tuple[list[dict], set]:
    """Each candidate in a process of its own, side by side (compiling is much of the time): (check rows, keys that
    passed every check)."""
    import tempfile
    checks, passed = [], set()
    procs = {}
    logs = tempfile.TemporaryDirectory()  # files, not pipes: a child's output never waits on the other's
    for i, key in enumerate(CANDIDATES):
        cmd = [sys.executable, "-m", "benchmarks.gpu.official_speed", "--verify-one", ",".join(map(str, key))]
        out, err = (open(Path(logs.name) / f"{i}.{kind}", "w+") for kind in ("out", "err"))
        procs[key] = (subprocess.Popen(cmd + (["--smoke"] if smoke else []), cwd=REPO, stdout=out, stderr=err,
                                       text=True), out, err)
    for key, (proc, out, err) in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.time()))
            timed_out = ""
        except subprocess.TimeoutExpired:
            proc.kill()
            rc, timed_out = proc.wait(), "\ntimed out (time budget)"
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read() + timed_out
        out.close()
        err.close()
        rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        out_lines += [json.dumps(r) for r in rows]
        if rc != 0:
            started = [json.loads(s) for s in stderr.splitlines() if s.startswith("{") and '"starting"' in s]
            failed = started[-1]["case"] if started else "?"
            error = (stderr.strip().splitlines() or ["?"])[-1][:200]
            rows.append({"key": list(key), "case": failed, "ok": False, "error": f"process failed: {error}"})
            out_lines.append(json.dumps(rows[-1]))
        checks += rows
        n_cases = len(SMOKE_CASES if smoke else GPU_CASES)
        if rc == 0 and len(rows) == n_cases and all(r["ok"] for r in rows):
            passed.add(key)
        log(f"verify {key}: {'PASS' if key in passed else 'FAIL'} ({len(rows)} checks, rc {rc})")
    logs.cleanup()
    return checks, passed


def verification_table(checks: list[dict], timings: list[dict], passed: set) -> str:
    nan = float("nan")
    lines = ["| launch (headdim, d_state, heads, chunk) | case | fp32 err | fp32 mamba-ssm err | bf16 err "
             "| bf16 mamba-ssm err | repeats equal | result |", "|---|---|---|---|---|---|---|---|"]
    for r in checks:
        if "error" in r:
            lines.append(f"| {tuple(r['key'])} | {r['case']} | | | | | | FAIL: {r['error']} |")
            continue
        eq = all(r.get(f"{p}_repeat_equal", True) for p in ("fp32", "bf16"))
        lines.append(f"| {tuple(r['key'])} | {r['case']} | {r.get('fp32_err', nan):.2e} | "
                     f"{r.get('fp32_mamba_err', nan):.2e} | {r.get('bf16_err', nan):.2e} | "
                     f"{r.get('bf16_mamba_err', nan):.2e} | {'yes' if eq else 'NO'} | "
                     f"{'PASS' if r['ok'] else 'FAIL'} |")
    if timings:
        lines += ["", "scan alone, bf16 (--smoke: fp32, one call's wall time), median ms (ours: several heads a "
                  "program; mamba-ssm: chunk 256)", "",
                  "| launch | batch, tokens | level | heads | segments | ours ms | mamba-ssm ms | committed launch ms "
                  "| 2x segments ms |", "|---|---|---|---|---|---|---|---|---|"]
        for t in timings:
            lines.append(f"| {tuple(t['key'])} | {t['timed']} | D/{t['level']} | {t['heads']} | {t['segments']} | "
                         f"{t.get('ours_ms', nan):.3f} | {t.get('mamba_ms', nan):.3f} | "
                         f"{t.get('current_ms', nan):.3f} | {t.get('segments_x2_ms', nan):.3f} |")
    lines += ["", "VERIFIED_MULTIHEAD entries this run supports (vision_model/ops/ssd_triton.py): "
              + (repr(sorted(passed)) if passed else "none")]
    return "\n".join(lines)


# -- (b) speed -----------------------------------------------------------------------------------------------------


def images_per_s(fn, x, device) -> float:
    import torch

    from benchmarks.measure import measure
    with torch.inference_mode():
        timing = measure(lambda: fn(x), device, warmup=2, repeats=10, seconds_per_point=1.0)
    return x.shape[0] / timing.median_s


def speed(args, passed: set, deadline: float, profile_lines: list[str]) -> list[dict]:
    import timm
    import torch

    import vision_model
    from benchmarks.measure import cuda_kernel_table, free_memory
    from vision_model.graphs import GraphedEmbed
    from vision_model.ops import ssd_triton
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    impls = [i for i in args.impls.split(",") if i]
    committed = set(ssd_triton.VERIFIED_MULTIHEAD)  # the current path's launches
    matmamba = None
    if "official" in impls:
        from benchmarks.gpu.official_parity import import_official
        matmamba = import_official(cpu=args.smoke)
    rows = []
    batches = SMOKE_BATCH if args.smoke else BATCH

    def record(**row):
        rows.append(row)
        log(json.dumps(row))

    def measured(label: dict, fn, x) -> None:
        """One row: images/s, or the error (out of memory, a launch that failed) and on to the next row."""
        try:
            record(**label, img_s=round(images_per_s(fn, x, device), 1))
        except Exception as exc:  # noqa: BLE001 - recorded; the rest of the table still runs
            record(**label, error=f"{type(exc).__name__}: {str(exc).strip()[:160]}")
            free_memory()

    def path(on: bool, headdim: int):
        """This run's passed launches for the head dim added to the committed ones (on), or the committed ones
        alone (off: the current path)."""
        ssd_triton.VERIFIED_MULTIHEAD.clear()
        ssd_triton.VERIFIED_MULTIHEAD.update(committed)
        if on:
            ssd_triton.VERIFIED_MULTIHEAD.update(k for k in passed if k[0] == headdim)

    def ours_rows(ours, key, size, batch, x, impl, has_new):
        headdim = ours.config.headdim
        for lv in args.levels:
            label = dict(model=key, impl=f"ours-{impl}", img=size, level=lv, batch=batch)
            if impl == "new" and not has_new:
                why = ("several-heads launch not verified in this run" if ssd_triton.heads_per_program(headdim)
                       else f"head dim {headdim}: the one-head kernel serves it (ours-current)")
                record(**label, skipped=why)
                continue
            if time.time() > deadline:
                record(**label, skipped="time budget")
                continue
            path(impl == "new", headdim)
            if impl == "graphs":
                # the current path through the product's graph cache (retrieval's encoder uses it for small
                # batches), one graph a row; a capture that fails runs eagerly with a warning in the log
                graphed = GraphedEmbed(ours, max_graphs=1, max_batch=batch)
                measured(label, lambda t, w=ours.widths(lv): graphed(t, w), x)
                del graphed
            else:
                measured(label, lambda t, lv=lv: ours.embed(t, level=lv), x)
        path(False, headdim)

    def profile(ours, key, size, batch, x, has_new):
        for impl in ("current", "new"):
            if impl == "new" and not has_new:
                continue
            path(impl == "new", ours.config.headdim)
            for lv in [int(v) for v in args.profile_levels.split(",") if v]:
                try:
                    with torch.inference_mode():
                        table = cuda_kernel_table(lambda lv=lv: ours.embed(x, level=lv), row_limit=14)
                except Exception as exc:  # noqa: BLE001 - the profile is context, not a result
                    table = f"profile failed: {type(exc).__name__}: {str(exc)[:160]}"
                profile_lines.append(f"== {key.upper()}, {size} px, batch {batch}, D/{lv}, ours-{impl} ==\n{table}\n")
        path(False, ours.config.headdim)
        log(f"profiled {key.upper()} at {size} px (profile.txt)")

    def agreement(ours, key, size, x):
        """The model end to end with the new kernel against the current path: features of the same images."""
        for lv in (1, 8):
            try:
                feats = []
                for on in (True, False):
                    path(on, ours.config.headdim)
                    with torch.inference_mode():
                        feats.append(ours.embed(x[:4], level=lv).float())
                diff = ((feats[0] - feats[1]).norm() / feats[1].norm()).item()
                record(model=key, impl="agreement", img=size, level=lv, rel_diff_new_vs_current=diff)
            except Exception as exc:  # noqa: BLE001 - context, the speed rows are the result
                record(model=key, impl="agreement", img=size, level=lv, error=f"{type(exc).__name__}: {exc}"[:160])
        path(False, ours.config.headdim)

    def official_rows(key, size, batch, x):
        from benchmarks.gpu.official_parity import build_official
        if time.time() > deadline:
            for lv in args.levels:
                record(model=key, impl="official", img=size, level=lv, batch=batch, skipped="time budget")
            return
        kw = dict(MODELS[key]["official"], image_size=size)
        if args.smoke:
            kw.update(d_model=SMOKE_MODELS[key]["d_model"], n_layer=2, patch_size=16)
        official = build_official(matmamba, device.type, 0, **kw).to(dtype)
        for lv in args.levels:
            label = dict(model=key, impl="official", img=size, level=lv, batch=batch)
            if time.time() > deadline:
                record(**label, skipped="time budget")
                continue
            measured(label, lambda t, lv=lv: official(t, mrl_level=lv, return_features=True), x)
        del official
        free_memory()

    # per size, most wanted first (a --budget cut takes the last): ViT-B/16, then per model our new path, the
    # official code, our current path (measured before, in section 18's table)
    for size in [int(s) for s in args.sizes.split(",")]:
        batch = batches.get(size, 4)
        x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
        if "vit" in impls:
            label = dict(model="vit_base_patch16", impl="timm", img=size, level=1, batch=batch)
            if time.time() > deadline:
                record(**label, skipped="time budget")
            else:
                kw = dict(depth=2) if args.smoke else {}
                vit = timm.create_model("vit_base_patch16_224", img_size=size, **kw).to(device, dtype).eval()
                measured(label, vit, x)
                del vit
                free_memory()
        for key in [m for m in args.models.split(",") if m]:
            spec = MODELS[key]
            overrides = dict(img_size=size, resize_size=None, **(SMOKE_MODELS[key] if args.smoke else {}))
            with torch.device(device):
                ours = vision_model.create_model(spec["name"], **overrides).to(dtype).eval()
            has_new = any(k[:2] == (ours.config.headdim, ours.config.d_state) for k in passed)
            if "ours-new" in impls:
                ours_rows(ours, key, size, batch, x, "new", has_new)
                if has_new and size == args.profile_size:
                    agreement(ours, key, size, x)
            if (size == args.profile_size and key in args.profile_models.split(",") and device.type == "cuda"
                    and time.time() < deadline - 30):
                profile(ours, key, size, batch, x, has_new)
            if matmamba is not None and spec["official"] is not None:
                official_rows(key, size, batch, x)
            if "ours-current" in impls:
                ours_rows(ours, key, size, batch, x, "current", has_new)
            if "ours-graphs" in impls and device.type == "cuda":
                ours_rows(ours, key, size, batch, x, "graphs", has_new)
            del ours
            free_memory()
        del x
    return rows


def speed_table(rows: list[dict], levels: list[int]) -> str:
    """Images/s per (model, impl, px) and each level; then the issue's ratios where both sides were measured."""
    agree = [r for r in rows if r["impl"] == "agreement"]
    rows = [r for r in rows if r["impl"] != "agreement"]
    got = {(r["model"], r["impl"], r["img"], r["level"]): r.get("img_s") for r in rows}
    keys = list(dict.fromkeys((r["model"], r["impl"], r["img"]) for r in rows))
    lines = ["| model | impl | px | batch | " + " | ".join("D" if lv == 1 else f"D/{lv}" for lv in levels)
             + " | D/8 ÷ D |", "|---|---|---|---|" + "---|" * (len(levels) + 1)]
    batch = {(r["model"], r["impl"], r["img"]): r["batch"] for r in rows}
    for model, impl, img in keys:
        vals = [got.get((model, impl, img, lv)) for lv in levels]
        d, d8 = got.get((model, impl, img, 1)), got.get((model, impl, img, 8))
        ratio = f"{d8 / d:.2f}" if d and d8 else "-"
        lines.append(f"| {model} | {impl} | {img} | {batch[(model, impl, img)]} | "
                     + " | ".join(f"{v:,.1f}" if v else "-" for v in vals) + f" | {ratio} |")
    lines += ["", "ratios (ours with the several-heads kernel; targets: 135M D >= 1.0x ViT-B/16 at 1024 px and >= 2.0x "
              "at 2048 px, every level >= 2.5x the official code at 1024 px, D/8 >= 4x D)", ""]
    for model in dict.fromkeys(k[0] for k in keys if k[0] != "vit_base_patch16"):
        for img in sorted({k[2] for k in keys}):
            for impl in ("ours-new", "ours-current"):
                d = got.get((model, impl, img, 1))
                vit = got.get(("vit_base_patch16", "timm", img, 1))
                parts = []
                if d and vit:
                    parts.append(f"D / ViT-B {d / vit:.2f}x")
                over = [f"{'D' if lv == 1 else f'D/{lv}'} "
                        f"{got[(model, impl, img, lv)] / got[(model, 'official', img, lv)]:.2f}x"
                        for lv in levels if got.get((model, impl, img, lv)) and got.get((model, "official", img, lv))]
                if over:
                    parts.append("over official: " + ", ".join(over))
                if d and got.get((model, impl, img, 8)):
                    parts.append(f"D/8 ÷ D {got[(model, impl, img, 8)] / d:.2f}")
                if parts:
                    lines.append(f"- {model} {impl} {img} px: " + "; ".join(parts))
    if agree:
        lines += ["", "features with the new kernel against the current path (same images, bf16): "
                  + "; ".join(f"{r['model']} {r['img']} px D/{r['level']} "
                              + (f"{r['rel_diff_new_vs_current']:.1e}" if "rel_diff_new_vs_current" in r
                                 else r.get("error", "?")) for r in agree)]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=False, help="folder for the result files")
    ap.add_argument("--budget", type=float, default=520, help="seconds; later rows are recorded as skipped")
    ap.add_argument("--smoke", action="store_true", help="CPU: Triton's interpreter, tiny shapes and models")
    ap.add_argument("--models", default="135m,35m")
    ap.add_argument("--sizes", help="image sizes, most important first (default 1024,2048,224; --smoke 32,48)")
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--impls", help="of ours-new, ours-current, ours-graphs (the current path as CUDA graphs), "
                                    "official, vit (default all but ours-graphs; --smoke: all but official, which "
                                    "takes minutes a call in the interpreter)")
    ap.add_argument("--profile-size", type=int, default=1024, help="profile at this size (CUDA)")
    ap.add_argument("--profile-models", default="135m", help="of --models, the ones profiled")
    ap.add_argument("--profile-levels", default="4,8", help="the levels profiled")
    ap.add_argument("--skip-verify", action="store_true", help="no (a): only the committed launches run")
    ap.add_argument("--verify-share", type=float, default=0.5,
                    help="the share of --budget the verification may take (the scan timings get 0.1 more); a cold "
                         "Triton cache spends minutes of it autotuning mamba-ssm's kernels in each candidate's process")
    ap.add_argument("--verify-one", help=argparse.SUPPRESS)  # a child process: one candidate's checks
    args = ap.parse_args(argv)
    started = time.time()
    deadline = started + args.budget
    if args.smoke:  # before anything imports Triton
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["MAMBA_DETERMINISTIC"] = "1"  # mamba-ssm: one launch config, the interpreter cannot autotune
    if args.smoke:
        import contextlib

        import torch
        torch.cuda.device = lambda *a, **k: contextlib.nullcontext()  # mamba-ssm enters it around its launches
    if args.verify_one:
        verify_candidate(tuple(int(v) for v in args.verify_one.split(",")), args.smoke)
        return 0
    if args.out is None:
        ap.error("--out is required")
    import torch
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke on a CPU")
    args.sizes = args.sizes or ("32,48" if args.smoke else "1024,2048,224")
    args.impls = args.impls if args.impls is not None else (
        "ours-new,ours-current,vit" if args.smoke else "ours-new,ours-current,official,vit")
    args.levels = [int(v) for v in args.levels.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    from benchmarks.measure import environment
    env = environment(torch.device("cpu" if args.smoke else "cuda"))
    log(json.dumps(env))

    verify_lines: list[str] = []
    checks, passed = ([], set()) if args.skip_verify else run_verification(
        args.smoke, started + args.verify_share * args.budget, verify_lines)
    try:
        timings = scan_timings(passed, started + (args.verify_share + 0.1) * args.budget, args.smoke)
    except Exception as exc:  # noqa: BLE001 - timings are context: the speed table still runs
        log(f"scan timings failed: {type(exc).__name__}: {str(exc)[:200]}")
        timings = []
    verify_lines += [json.dumps(t) for t in timings]
    (args.out / "verify.jsonl").write_text("".join(line + "\n" for line in verify_lines))
    vtable = verification_table(checks, timings, passed)
    log(vtable)

    profile_lines: list[str] = []
    rows = []
    try:
        rows = speed(args, passed, deadline, profile_lines)
    finally:  # partial results survive a failure in the speed part
        if profile_lines:
            (args.out / "profile.txt").write_text("\n".join(profile_lines))
        stable = speed_table(rows, args.levels) if rows else "(no speed rows)"
        result = {"environment": env, "passed": sorted(passed), "checks": checks, "scan_timings": timings,
                  "speed": rows, "wall_s": round(time.time() - started, 1), "budget_s": args.budget,
                  "smoke": args.smoke}
        (args.out / "official_speed.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "official_speed.md").write_text(
            f"# The paper's shapes at inference ({env['device']}, {env['date']})\n\n"
            f"## (a) several-heads SSD forward: verification\n\n{vtable}\n\n"
            f"## (b) images/s, {'fp32 (smoke)' if args.smoke else 'bf16'}\n\n{stable}\n")
        log(stable)
        log(f"wall {result['wall_s']} s; verified: {sorted(passed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
