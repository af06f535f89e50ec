"""GPU diagnostic (not part of CI): what each inference fusion buys, in one process, on the 135M config.

    python benchmarks/gpu/speed_ablation.py [--quick] [--profile] [--graphs]    # needs CUDA and mamba-ssm

1. Agreement: the fused Triton path vs the PyTorch backend (bf16, inference) at every level.
2. Ablation at 1024 px (batch 16) and 2048 px (batch 4), D and D/8, bf16, inference_mode; ViT-B/16 in the same run:
   "unfused" = F.conv1d + PyTorch gated norm + PyTorch RMSNorm + contiguous copies before the scan (the block as it
   was before the fusions, except that the residual add now always runs inside out_proj's GEMM), then each fusion
   added in turn, then chunk sizes.
3. --profile: the top CUDA kernels of the unfused and the fused forward at 1024 px, D.
4. --graphs: batch-1 latency at 224 px, eager vs one CUDA graph, D and D/8.
The variants swap the module-level functions the block calls; that is fine for a diagnostic, not for the library.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import timm
import torch

import vision_model.block as block_mod
from benchmarks.measure import cuda_kernel_table, interleaved_best, measure, rel_error as rel
from vision_model import create_model
from vision_model.ops import backends


@contextlib.contextmanager
def variant(conv: bool, gnorm: bool, norm: bool, nocopy: bool, ssd_kernel: bool = False):
    """Swap the fused ops for their PyTorch versions where a flag is False; `ssd_kernel` picks the one-kernel SSD
    forward (True) or mamba-ssm's chunked scan at the block's chunk size (False) for every call, whatever
    `backends.fused_forward_supported` would choose."""
    saved = {k: getattr(block_mod, k) for k in ("causal_conv1d_silu", "gated_rms_norm", "rms_norm", "ssd_scan")}
    saved_policy = backends.fused_forward_supported
    saved_fold = block_mod.Block.forward_fused.__defaults__
    backends.fused_forward_supported = lambda headdim, d_state: ssd_kernel
    if not conv:
        block_mod.causal_conv1d_silu = lambda x, w, b, backend, **kw: backends.causal_conv1d_silu(x, w, b, "torch",
                                                                                                 **kw)
    if not gnorm:
        block_mod.gated_rms_norm = lambda y, z, w, eps, backend, **kw: backends.gated_rms_norm(y, z, w, eps, "torch",
                                                                                             **kw)
    if not norm:  # the PyTorch pre-norm, not folded into in_proj
        block_mod.Block.forward_fused.__defaults__ = (None, "auto", False)
        block_mod.rms_norm = lambda x, w, eps, backend: backends.rms_norm(x, w, eps, "torch")
    if not nocopy:
        def copying_scan(x, dt, A, B, C, D, dt_bias, chunk_size, backend, dt_scale=None):
            return backends.ssd_scan(x.contiguous(), dt.contiguous(), A, B.contiguous(), C.contiguous(), D, dt_bias,
                                     chunk_size, backend, dt_scale)
        block_mod.ssd_scan = copying_scan
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(block_mod, k, v)
        backends.fused_forward_supported = saved_policy
        block_mod.Block.forward_fused.__defaults__ = saved_fold


VARIANTS = [
    ("unfused", dict(conv=False, gnorm=False, norm=False, nocopy=False)),
    ("+no-copy", dict(conv=False, gnorm=False, norm=False, nocopy=True)),
    ("+conv", dict(conv=True, gnorm=False, norm=False, nocopy=True)),
    ("+gated-norm", dict(conv=True, gnorm=True, norm=False, nocopy=True)),
    ("+norm kernel (pre-norm folded into in_proj)", dict(conv=True, gnorm=True, norm=True, nocopy=True)),
    ("+one-kernel SSD forward (all)", dict(conv=True, gnorm=True, norm=True, nocopy=True, ssd_kernel=True)),
]


def set_chunk(model, chunk):
    for blk in model.blocks:
        blk.mixer.chunk_size = chunk


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--graphs", action="store_true")
    ap.add_argument("--chunks", type=int, nargs="*", default=[128, 256])
    ap.add_argument("--headdims", type=int, nargs="*", default=[], help="also time the fused model at these headdims")
    ap.add_argument("--rounds", type=int, default=3, help="variants are timed in interleaved rounds; best round kept")
    ap.add_argument("--out", default=None, help="also append every JSON line to this file")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.backends.cudnn.benchmark = True  # as `matsearch bench` does: conv algorithms picked per shape
    torch.manual_seed(0)
    t0 = time.time()
    model = create_model("matmamba_vision_135m").to(dev, dt).eval()
    sink = open(args.out, "a") if args.out else None

    def out(**kw):
        print(json.dumps(kw), flush=True)
        if sink:
            sink.write(json.dumps(kw) + "\n")
            sink.flush()

    # 1. agreement
    x = torch.randn(4, 3, 224, 224, device=dev, dtype=dt)
    with torch.inference_mode():
        for lv in model.config.levels:
            fused = model.embed(x, level=lv, backend="triton").float()
            ref = model.embed(x, level=lv, backend="torch").float()
            with variant(False, False, False, False):
                unfused = model.embed(x, level=lv, backend="triton").float()
            with variant(True, True, True, True):
                mamba_ssd = model.embed(x, level=lv, backend="triton").float()
            out(check="agreement", level=lv, fused_vs_torch=rel(fused, ref), unfused_triton_vs_torch=rel(unfused, ref),
                fused_with_mamba_ssd_vs_torch=rel(mamba_ssd, ref))
    out(at="agreement done", s=round(time.time() - t0, 1))

    # 2. ablation
    vit = timm.create_model("vit_base_patch16_224", num_classes=0, dynamic_img_size=True).to(dev, dt).eval()
    points = [(1024, 16)] if args.quick else [(1024, 16), (2048, 4)]
    others = {hd: create_model("matmamba_vision_135m", headdim=hd).to(dev, dt).eval() for hd in args.headdims}
    with torch.inference_mode():
        for res, batch in points:
            x = torch.randn(batch, 3, res, res, device=dev, dtype=dt)
            calls = [(dict(model="vit_base_patch16"), lambda: vit(x))]
            for lv in (1, 8):
                for name, flags in VARIANTS:
                    calls.append((dict(model="135m", level=lv, variant=name, flags=flags),
                                  lambda lv=lv: model.embed(x, level=lv)))
                for chunk in args.chunks:
                    calls.append((dict(model="135m", level=lv, variant=f"+norm kernel, chunk {chunk}", chunk=chunk,
                                       flags=VARIANTS[-2][1]), lambda lv=lv: model.embed(x, level=lv)))
                for hd, other in others.items():
                    for chunk in args.chunks:
                        calls.append((dict(model=f"135m headdim {hd}", level=lv, variant=f"all, chunk {chunk}",
                                           chunk=chunk), lambda lv=lv, other=other: other.embed(x, level=lv)))
            def context(desc):
                for m in [model, *others.values()]:
                    set_chunk(m, desc.get("chunk", model.config.chunk_size))
                return variant(**desc.get("flags", VARIANTS[-1][1]))
            best = interleaved_best([(lambda desc=desc: context(desc), call) for desc, call in calls], dev, args.rounds)
            for m in [model, *others.values()]:
                set_chunk(m, model.config.chunk_size)
            for i, (desc, _) in enumerate(calls):
                desc = {k: v for k, v in desc.items() if k not in ("flags", "chunk")}
                out(point=res, batch=batch, **desc, img_s=batch / best[i])
            out(at=f"{res} done", s=round(time.time() - t0, 1))

    # 3. profile
    if args.profile:
        x = torch.randn(16, 3, 1024, 1024, device=dev, dtype=dt)
        profiled = [(name, flags, model, 1) for name, flags in (VARIANTS[0], VARIANTS[-2], VARIANTS[-1])]
        profiled += [(name, flags, model, 8) for name, flags in VARIANTS[-2:]]
        profiled += [(f"headdim {hd}", VARIANTS[-1][1], other, 1) for hd, other in others.items()]
        for name, flags, m, lv in profiled:
            with torch.inference_mode(), variant(**flags):
                table = cuda_kernel_table(lambda: m.embed(x, level=lv), row_limit=18)
            print(f"== profile: {name}, 1024 px, batch 16, level {lv}")
            print(table)

    # 4. CUDA graphs at batch 1
    if args.graphs:
        from vision_model.graphs import capture_cuda_graph
        x = torch.randn(1, 3, 224, 224, device=dev, dtype=dt)
        with torch.inference_mode():
            for lv in (1, 8):
                fn = lambda t: model.embed(t, level=lv)
                eager = measure(lambda: fn(x), dev, warmup=3, repeats=30).median_s
                try:
                    replay = capture_cuda_graph(fn, x)
                    graphed = measure(replay, dev, warmup=3, repeats=30).median_s
                    err = rel(replay().float(), fn(x).float())
                except Exception as exc:  # noqa: BLE001 - report and go on
                    graphed, err = None, f"{type(exc).__name__}: {str(exc)[:200]}"
                out(check="latency224", level=lv, eager_ms=eager * 1e3, graph_ms=graphed and graphed * 1e3, graph_err=err)
        from vision_model.graphs import GraphedEmbed
        graphed = GraphedEmbed(model)
        with torch.inference_mode():
            for batch in (1, 3, 1):
                x = torch.randn(batch, 3, 224, 224, device=dev, dtype=dt)
                widths = model.widths(level=4)
                out(check="GraphedEmbed", batch=batch, graphs=len(graphed._graphs),
                    rel_err=rel(graphed(x, widths).float(), model.embed(x, widths=widths).float()))
    out(at="done", s=round(time.time() - t0, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
