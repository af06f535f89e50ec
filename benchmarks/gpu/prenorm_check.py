"""The training pre-norm fused with in_proj on the GPU (issue 28): our Triton passes (`vision_model.ops.prenorm`)
against mamba-ssm's `layer_norm_linear_fn` and PyTorch's, for correctness and time.

    python3 -m benchmarks.gpu.prenorm_check --out $OUT/prenorm       # H200, seconds (mamba-ssm on PYTHONPATH)

For each shape (the issue-28 configuration's D layer and the 35M's at 224 px) and norm (RMSNorm, LayerNorm with
bias), in fp32 and under bf16 autocast: the output and the gradients of x, the norm's weight and bias and in_proj's
weight, each as the relative error against autograd through `norm_linear_ref` in float64 on the same inputs; then
forward + backward time (median ms, triton.testing.do_bench) of each implementation under bf16 autocast, and the
GPU time of its kernels in one such call (torch.profiler): where the first is much larger than the second, the call
waits on the host (Python, launches), which a training step queued ahead of the GPU hides. Writes prenorm.jsonl (one
line per measurement) and prenorm.md (the tables).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# (name, rows, d_model, in_proj rows): one layer's pre-norm + in_proj at D
SHAPES = [("issue28 D (1024 x 145)", 1024 * 145, 384, 2 * 768 + 2 * 64 + 48),
          ("35M at 224 px (128 x 197)", 128 * 197, 512, 2 * 1024 + 2 * 128 + 64)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import torch
    from triton.testing import do_bench

    from benchmarks.measure import cuda_kernel_ms

    from vision_model.ops.backends import mamba_ssm_op
    from vision_model.ops.prenorm import norm_linear_ref, norm_linear_triton
    if not torch.cuda.is_available():
        raise SystemExit("prenorm_check: needs CUDA")
    mamba = mamba_ssm_op("layer_norm", "layer_norm_linear_fn")
    impls = {"ours": lambda x, w, b, W, rms: norm_linear_triton(x, w, b, W, 1e-5, rms),
             "pytorch": lambda x, w, b, W, rms: norm_linear_ref(x, w, b, W, 1e-5, rms)}
    if mamba is not None:
        impls["mamba-ssm"] = lambda x, w, b, W, rms: mamba(x, w, b, W, None, eps=1e-5, is_rms_norm=rms)
    args.out.mkdir(parents=True, exist_ok=True)
    lines, md = [], ["| shape | norm | impl | fp32 worst err | bf16 worst err | fwd+bwd bf16 ms | its kernels ms |",
                     "|---|---|---|---|---|---|---|"]

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    for name, rows, d, n_out in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        x0 = torch.randn(rows, d, device="cuda", generator=g) * 2 + 0.5
        w0 = 1 + 0.1 * torch.randn(d, device="cuda", generator=g)
        b0 = 0.1 * torch.randn(d, device="cuda", generator=g)
        W0 = torch.randn(n_out, d, device="cuda", generator=g) / d ** 0.5
        dout = torch.randn(rows, n_out, device="cuda", generator=g)
        for rms in (True, False):
            leaves = [x0.double(), w0.double(), None if rms else b0.double(), W0.double()]
            leaves = [t.requires_grad_() if t is not None else None for t in leaves]
            ref_out = norm_linear_ref(*leaves, 1e-5, rms)
            ref = [ref_out.detach()] + list(torch.autograd.grad(ref_out, [t for t in leaves if t is not None],
                                                                 dout.double()))
            del ref_out, leaves
            for impl, fn in impls.items():
                row = {"shape": name, "norm": "rmsnorm" if rms else "layernorm", "impl": impl}
                for label in ("fp32", "bf16"):
                    leaves = [x0.clone(), w0.clone(), None if rms else b0.clone(), W0.clone()]
                    leaves = [t.requires_grad_() if t is not None else None for t in leaves]
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=label == "bf16"):
                        out = fn(*leaves, rms)
                    got = [out.detach()] + list(torch.autograd.grad(out, [t for t in leaves if t is not None],
                                                                     dout.to(out.dtype)))
                    errs = [rel(a, b) for a, b in zip(got, ref)]
                    row[f"{label}_errs"] = errs  # out, dx, dweight, (dbias,) d_in_proj
                    row[f"{label}_worst"] = max(errs)
                    del out, got, leaves
                leaves = [x0.clone(), w0.clone(), None if rms else b0.clone(), W0.clone()]
                leaves = [t.requires_grad_() if t is not None else None for t in leaves]
                dout_bf = dout.bfloat16()

                def step():
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        out = fn(*leaves, rms)
                    torch.autograd.backward(out, dout_bf)
                row["fwd_bwd_ms"] = do_bench(step, return_mode="median")
                row["kernels_ms"] = cuda_kernel_ms(step)
                del leaves
                lines.append(json.dumps(row))
                print(lines[-1], flush=True)
                md.append(f"| {name} | {row['norm']} | {impl} | {row['fp32_worst']:.2e} | {row['bf16_worst']:.2e} "
                          f"| {row['fwd_bwd_ms']:.3f} | {row['kernels_ms']:.3f} |")
            torch.cuda.empty_cache()
    (args.out / "prenorm.jsonl").write_text("".join(line + "\n" for line in lines))
    (args.out / "prenorm.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
