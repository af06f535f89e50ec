"""GPU check (not part of CI): accuracy of the one-kernel SSD forward (`vision_model.ops.ssd_triton`) for each launch
config on the encoders' real shapes, in bf16 and fp32, each launch repeated on the same inputs, against the
float64 recurrence (mamba-ssm's chunked scan on these bf16 inputs: ~2.2e-3, docs/notes.md section 11).

    python benchmarks/gpu/ssd_forward_accuracy.py > accuracy.jsonl      # needs CUDA and mamba-ssm

Each shape runs in its own process; a launch that faults ("illegal memory access" poisons the CUDA context) is
recorded as such and a fresh process goes on with the next config. Triton's CPU interpreter cannot stand in here: it has no
bfloat16 (the same kernel gives garbage in bf16 under TRITON_INTERPRET and 2e-4 in fp16).
"""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

# (name, batch, seqlen, heads, headdim, d_state, timed): the 135M config (headdim 64), the 35M config and the
# Fashion-MNIST model (headdim 16)
SHAPES = [
    ("135m-224-D-b1", 1, 197, 32, 64, 128, False), ("135m-224-D/8-b1", 1, 197, 4, 64, 128, False),
    ("135m-1024-D-b16", 16, 4097, 32, 64, 128, True), ("35m-224-D-b8", 8, 197, 64, 16, 128, False),
    ("fmnist-D-b64", 64, 50, 24, 16, 32, False),
]
# the default launch (None), the sequence cut into 2 and 4 segments, and the launches found wrong (unverified: they
# show whether the race is still there)
CONFIGS = [None, dict(segments=2), dict(segments=4), dict(num_stages=2), dict(segments=2, num_stages=2),
           dict(BLOCK_P=16)]
REPEATS = 3  # the same launch on the same inputs: a spread between repeats means a race


def run_shape(shape: str, skip: int) -> None:
    from ssd_forward_sweep import inputs  # same inputs as the speed sweep
    from triton.testing import do_bench

    from vision_model.ops.ssd_minimal import ssd_chunked
    from vision_model.ops.ssd_triton import check_cuda_launch, launch_config, ssd_forward_triton

    name, b, l, h, p, n, timed = next(s for s in SHAPES if s[0] == shape)
    x, dt, A, B, C, D, dt_bias = inputs(b, l, h, p, n)
    ref = ssd_chunked(*(v.double() for v in (x, F.softplus(dt.float() + dt_bias), A, B, C, D)), chunk_size=256)
    rel = lambda y, ref=ref: round(((y.double() - ref).norm() / ref.norm()).item(), 6)
    # dt scaled per row, as the block does with the pre-norm folded into in_proj
    scale = torch.rand(b, l, device=x.device) + 0.5
    ref_scaled = ssd_chunked(*(v.double() for v in (x, F.softplus(dt.float() * scale[..., None] + dt_bias), A, B, C,
                                                     D)), chunk_size=256)
    for i, config in enumerate(CONFIGS):
        cfg = dict(launch_config(b, h, p, n, l, x.device), **(config or {}))
        if "BLOCK_P" in (config or {}):  # a one-head launch asked for: not the several-heads default
            cfg.pop("HEADS", None)
        if i < skip or cfg.get("BLOCK_P", 0) > p or cfg["segments"] > max(1, l // 64):
            continue
        try:
            check_cuda_launch(cfg, p, n)
            verified = True
        except ValueError:
            verified = False
        print(json.dumps({"shape": name, "case": i, "starting": True}), file=sys.stderr, flush=True)
        row = {"shape": name, "case": i, **cfg, "verified": verified}
        for label, (xv, dtv, Bv, Cv) in {"bf16": (x, dt, B, C),
                                         "fp32": tuple(v.float() for v in (x, dt, B, C))}.items():
            row[label] = [rel(ssd_forward_triton(xv, dtv, A, Bv, Cv, D, dt_bias, config=dict(cfg), unverified=True))
                          for _ in range(REPEATS if label != "fp32" else 1)]
        row["bf16_dt_scale"] = [rel(ssd_forward_triton(x, dt, A, B, C, D, dt_bias, dt_scale=scale, config=dict(cfg),
                                                       unverified=True), ref_scaled) for _ in range(REPEATS)]
        if timed:
            row["ms_bf16"] = round(do_bench(lambda: ssd_forward_triton(x, dt, A, B, C, D, dt_bias, config=dict(cfg),
                                                                               unverified=True),
                                            return_mode="median"), 4)
        print(json.dumps(row), flush=True)


def check_shape(shape: str) -> str:
    """All configs on one shape, a fresh process after each fault; the JSON lines."""
    out, skip = [], 0
    while skip < len(CONFIGS):
        proc = subprocess.run([sys.executable, __file__, "--shape", shape, str(skip)],
                              capture_output=True, text=True, timeout=400)
        out.append(proc.stdout)
        if proc.returncode == 0:
            break
        started = [json.loads(line) for line in proc.stderr.splitlines() if '"starting"' in line]
        failed = started[-1]["case"] if started else skip
        out.append(json.dumps({"shape": shape, "case": failed, **(CONFIGS[failed] or {"default": True}),
                               "failed": proc.stderr.strip().splitlines()[-1][:160]}) + "\n")
        skip = failed + 1
    return "".join(out)


def main() -> None:
    # untimed shapes side by side (compiling is most of the time), then the timed ones alone
    with ThreadPoolExecutor(4) as pool:
        for text in pool.map(check_shape, [s[0] for s in SHAPES if not s[-1]]):
            sys.stdout.write(text)
            sys.stdout.flush()
    for shape in (s[0] for s in SHAPES if s[-1]):
        sys.stdout.write(check_shape(shape))
        sys.stdout.flush()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--shape":
        run_shape(sys.argv[2], int(sys.argv[3]))
    else:
        main()
