"""GPU diagnostic (not part of CI): the d_model-wide stream and the small kernels around the SSD, on the 135M config.

    python benchmarks/gpu/stream_sweep.py [--out FILE] [--skip ...]      # needs CUDA and mamba-ssm

1. Norms at 1024 px, batch 16 (65552 rows): our RMSNorm kernel (tile sizes x warps) against mamba-ssm's kernels
   (plain, add + norm, gated) and F.rms_norm; bf16 error against the fp32 PyTorch definition.
2. The causal conv + SiLU at D/8 and D: tile length x channels x warps.
3. out_proj with the residual add inside the GEMM (addmm) against a GEMM then an add; in_proj output padding at D/8.
4. Patch rows for the patch GEMM: our kernel against PyTorch's permuted copy.
5. The pre-norm folded into in_proj: the rstd-only pass against the plain norm, and the conv and the gated norm with
   and without the row scale they then apply, at D/8 and D.
6. Whole encoder, eager or as CUDA graph replays (`--graphs`), interleaved rounds (best round kept), by default
   1024 px batch 16 at every level and 2048 px batch 4 (`--points`): "previous" (the forward of section 11's
   benchmark: tokens concatenated, mamba-ssm's add + RMSNorm and gated norm, out_proj then a separate add) against
   the current forward, and the current forward with one piece taken back or swapped (the pre-norm not folded,
   in_proj padded to 8, PyTorch's patch copy, the norms' first launch rule, the swept conv launch; `--variants`
   picks); agreement with the PyTorch backend; a profile of the current forward at D and D/8.
(Runs 2 and 3 of 2026-11-24 also swept a fused block tail, removed since: docs/notes.md, section 12; section 13's
run swept a Triton kernel for out_proj's in-place residual GEMM against cuBLAS, removed since: commit da25363.)
Op timings: 20 back-to-back calls between two CUDA events (one call per event pair would time the launch too).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import time

import torch
import torch.nn.functional as F
import triton

import vision_model.block as block_mod
import vision_model.ops.conv as conv_mod
from benchmarks.measure import cuda_event_ms, cuda_kernel_table, interleaved_best, rel_error as rel
from vision_model import create_model
from vision_model.ops import backends
from vision_model.ops.rmsnorm import rms_norm_triton

DEV, DT = torch.device("cuda"), torch.bfloat16
ROWS = 16 * 4097


def mamba(module, name):
    return backends.mamba_ssm_op(module, name)


def sweep_norms(out):
    rms_norm_fn = mamba("layer_norm", "rms_norm_fn")
    gated_fn = mamba("layernorm_gated", "rmsnorm_fn")
    x = torch.randn(ROWS, 1024, device=DEV, dtype=DT)
    res = torch.randn_like(x)
    w = torch.rand(1024, device=DEV, dtype=DT) + 0.5
    ref = backends.rms_norm(x.float(), w.float(), 1e-5, "torch")
    out(op="rms_norm", n=1024, impl="mamba add+norm",
        ms=cuda_event_ms(lambda: rms_norm_fn(x, w, None, residual=res, eps=1e-5, prenorm=True)))
    out(op="rms_norm", n=1024, impl="mamba", ms=cuda_event_ms(lambda: rms_norm_fn(x, w, None, eps=1e-5)),
        err=rel(rms_norm_fn(x, w, None, eps=1e-5), ref))
    out(op="rms_norm", n=1024, impl="F.rms_norm", ms=cuda_event_ms(lambda: F.rms_norm(x, (1024,), w, 1e-5)))
    for tile, warps in itertools.product((1024, 2048, 4096, 8192), (2, 4, 8)):
        call = lambda: rms_norm_triton(x, w, 1e-5, rows_per_program=tile // 1024, num_warps=warps)
        out(op="rms_norm", n=1024, impl="ours", tile=tile, warps=warps, ms=cuda_event_ms(call), err=rel(call(), ref))
    for n in (256, 512, 1024, 2048):  # gated: D/8 .. D inner widths; z a slice of a wider in_proj output
        y = torch.randn(ROWS, n, device=DEV, dtype=DT)
        z = torch.randn(ROWS, 2 * n + 264, device=DEV, dtype=DT)[:, :n]
        wn = torch.rand(n, device=DEV, dtype=DT) + 0.5
        ref = backends.gated_rms_norm(y.float(), z.float(), wn.float(), 1e-5, "torch")
        call = lambda: gated_fn(y, wn, None, z=z, eps=1e-5, group_size=None, norm_before_gate=False)
        out(op="gated", n=n, impl="mamba", ms=cuda_event_ms(call), err=rel(call(), ref))
        for tile, warps in itertools.product((1024, 2048, 4096, 8192), (2, 4, 8)):
            call = lambda: rms_norm_triton(y, wn, 1e-5, z=z, rows_per_program=max(1, tile // n), num_warps=warps)
            out(op="gated", n=n, impl="ours", tile=tile, warps=warps, ms=cuda_event_ms(call), err=rel(call(), ref))


def sweep_conv(out):
    best = {}
    for name, inner in (("D/8", 256), ("D", 2048)):
        width = 2 * inner + 256 + inner // 64
        width += -width % block_mod.IN_PROJ_ROW_MULTIPLE
        zxbcdt = torch.randn(16, 4097, width, device=DEV, dtype=DT)
        xbc = zxbcdt[..., inner:2 * inner + 256]
        c = xbc.shape[-1]
        w, b = torch.randn(c, 1, 4, device=DEV, dtype=DT) * 0.3, torch.randn(c, device=DEV, dtype=DT) * 0.1
        ref = conv_mod.causal_conv1d_silu_ref(xbc.float(), w.float(), b.float())
        for bl, bc, warps in itertools.product((16, 32, 64, 128), (64, 128, 256), (2, 4, 8)):
            if bl * bc > 16384:
                continue
            call = lambda: conv_mod.causal_conv1d_silu_triton(xbc, w, b, block_l=bl, block_c=bc, num_warps=warps)
            t = cuda_event_ms(call)
            out(op="conv", shape=name, block_l=bl, block_c=bc, warps=warps, ms=t, err=rel(call(), ref))
            # the pick minimises 4 x D/8 + D: D/8 >= 4x D is the target this serves
            best[(bl, bc, warps)] = best.get((bl, bc, warps), 0.0) + t * (4.0 if name == "D/8" else 1.0)
    return min(best, key=best.get)


def sweep_gemms(out):
    for inner in (256, 2048):
        y = torch.randn(ROWS, inner, device=DEV, dtype=DT)
        w = torch.randn(1024, inner, device=DEV, dtype=DT) * 0.02
        res = torch.randn(ROWS, 1024, device=DEV, dtype=DT)
        out(op="out_proj", inner=inner, impl="linear", ms=cuda_event_ms(lambda: F.linear(y, w)))
        out(op="out_proj", inner=inner, impl="linear + add", ms=cuda_event_ms(lambda: F.linear(y, w) + res))
        out(op="out_proj", inner=inner, impl="addmm", ms=cuda_event_ms(lambda: torch.addmm(res, y, w.t())),
            err=rel(torch.addmm(res, y, w.t()), F.linear(y.float(), w.float()) + res.float()))
    x = torch.randn(ROWS, 1024, device=DEV, dtype=DT)
    for rows in (772, 776, 784, 800, 832, 896, 1024, 1540, 1544, 1552, 1600, 1664):
        w = torch.randn(rows, 1024, device=DEV, dtype=DT) * 0.02
        out(op="in_proj", rows=rows, ms=cuda_event_ms(lambda: F.linear(x, w)))


def sweep_fold(out):
    from vision_model.ops.rmsnorm import rms_rstd_triton
    x = torch.randn(ROWS, 1024, device=DEV, dtype=DT)
    w = torch.rand(1024, device=DEV, dtype=DT) + 0.5
    rstd = rms_rstd_triton(x, 1e-5)
    out(op="fold", part="pre-norm", impl="norm", ms=cuda_event_ms(lambda: rms_norm_triton(x, w, 1e-5)))
    out(op="fold", part="pre-norm", impl="rstd only", ms=cuda_event_ms(lambda: rms_rstd_triton(x, 1e-5)),
        err=rel(rstd, torch.rsqrt(x.float().pow(2).mean(-1) + 1e-5)))
    scale = rstd.view(16, 4097)
    for name, inner in (("D/8", 256), ("D", 2048)):
        width = 2 * inner + 256 + inner // 64
        width += -width % block_mod.IN_PROJ_ROW_MULTIPLE
        zxbcdt = torch.randn(16, 4097, width, device=DEV, dtype=DT)
        z, xbc = zxbcdt[..., :inner], zxbcdt[..., inner:2 * inner + 256]
        c = xbc.shape[-1]
        cw, cb = torch.randn(c, 1, 4, device=DEV, dtype=DT) * 0.3, torch.randn(c, device=DEV, dtype=DT) * 0.1
        ref = conv_mod.causal_conv1d_silu_ref(xbc.float(), cw.float(), cb.float(), scale)
        out(op="fold", part="conv", shape=name, impl="plain",
            ms=cuda_event_ms(lambda: conv_mod.causal_conv1d_silu_triton(xbc, cw, cb)))
        out(op="fold", part="conv", shape=name, impl="row scale",
            ms=cuda_event_ms(lambda: conv_mod.causal_conv1d_silu_triton(xbc, cw, cb, scale)),
            err=rel(conv_mod.causal_conv1d_silu_triton(xbc, cw, cb, scale), ref))
        y = torch.randn(16, 4097, inner, device=DEV, dtype=DT)
        wn = torch.rand(inner, device=DEV, dtype=DT) + 0.5
        ref = backends.gated_rms_norm(y.float(), z.float(), wn.float(), 1e-5, "torch", z_scale=scale)
        out(op="fold", part="gated norm", shape=name, impl="plain",
            ms=cuda_event_ms(lambda: rms_norm_triton(y, wn, 1e-5, z=z)))
        out(op="fold", part="gated norm", shape=name, impl="z scale",
            ms=cuda_event_ms(lambda: rms_norm_triton(y, wn, 1e-5, z=z, z_scale=scale)),
            err=rel(rms_norm_triton(y, wn, 1e-5, z=z, z_scale=scale), ref))


def sweep_patchify(out):
    from vision_model.ops.patchify import patchify_triton
    for res, batch in ((1024, 16), (2048, 4), (224, 256)):
        x = torch.randn(batch, 3, res, res, device=DEV, dtype=DT)
        g = res // 16
        buf = torch.empty(batch, g * g + 1, 768, device=DEV, dtype=DT)

        def torch_copy():
            unfolded = x.reshape(batch, 3, g, 16, g, 16).permute(0, 2, 4, 1, 3, 5)
            buf[:, :-1].view(batch, g, g, 3, 16, 16).copy_(unfolded)
        torch_copy()
        ref = buf.clone()
        buf.zero_()
        patchify_triton(x, 16, buf)
        equal = bool(torch.equal(buf[:, :-1], ref[:, :-1]))
        out(op="patchify", res=res, batch=batch, torch_ms=cuda_event_ms(torch_copy),
            triton_ms=cuda_event_ms(lambda: patchify_triton(x, 16, buf)), equal=equal)


@contextlib.contextmanager
def previous_ops():
    """The block's gated norm as the last benchmark ran it (mamba-ssm's kernel)."""
    saved = block_mod.gated_rms_norm
    gated_fn = mamba("layernorm_gated", "rmsnorm_fn")
    block_mod.gated_rms_norm = lambda y, z, w, eps, backend, z_scale=None: gated_fn(
        y, w, None, z=z, eps=eps, group_size=None, norm_before_gate=False)
    try:
        yield
    finally:
        block_mod.gated_rms_norm = saved


def embed_previous(model, x, level):
    """The forward of the last benchmark: tokens by concatenation, the residual add fused into the next block's
    RMSNorm (mamba-ssm), out_proj writing its own output, a full-sequence add at the end."""
    rms_norm_fn = mamba("layer_norm", "rms_norm_fn")
    p = model.config.patch_size
    tokens = model._patch_tokens(x) + model._pos_embed((x.shape[-2] // p, x.shape[-1] // p))
    tokens = torch.cat([tokens, model.cls_token.expand(tokens.shape[0], -1, -1)], dim=1)
    hidden, residual = tokens, None
    with previous_ops():
        for blk, width in zip(model.blocks, model.widths(level)):
            normed, residual = rms_norm_fn(hidden, blk.norm.weight, None, residual=residual, eps=blk.norm.eps,
                                           prenorm=True)
            hidden = blk.mixer(normed, model.config.inner_of(width), "triton")
    return model.norm((hidden + residual)[:, -1])


@contextlib.contextmanager
def setting(model, in_proj_multiple=64, patchify=True, conv=None, wide_norm_tiles=False, fold_norm=True):
    """The current forward with in_proj padded to another multiple, PyTorch's permuted copy for the patches, another
    conv launch (block_l, block_c, warps), the norms' first launch rule (4096-value tiles, 4 warps), or the pre-norm
    not folded into in_proj."""
    import vision_model.model as model_mod
    import vision_model.ops.rmsnorm as norm_mod
    saved = (block_mod.IN_PROJ_ROW_MULTIPLE, model_mod.patchify_triton, conv_mod.causal_conv1d_silu_triton.__defaults__,
             norm_mod.launch, block_mod.Block.forward_fused.__defaults__)

    def clear_weight_caches():
        for m in model.modules():
            if isinstance(m, block_mod.MatMamba2):
                m.clear_derived()
    if not patchify:
        def permuted_copy(x, p, patches):
            b, c, H, W = x.shape
            unfolded = x.reshape(b, c, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
            patches[:, :-1].view(b, H // p, W // p, c, p, p).copy_(unfolded)
        model_mod.patchify_triton = permuted_copy
    if conv:
        conv_mod.causal_conv1d_silu_triton.__defaults__ = (None, *conv)
    if not fold_norm:
        block_mod.Block.forward_fused.__defaults__ = (None, "auto", False)
    if wide_norm_tiles:
        norm_mod.launch = lambda width: (max(1, 4096 // triton.next_power_of_2(width)),
                                         triton.next_power_of_2(width), 4)
    if in_proj_multiple != saved[0]:
        block_mod.IN_PROJ_ROW_MULTIPLE = in_proj_multiple
        clear_weight_caches()
    try:
        yield
    finally:
        block_mod.IN_PROJ_ROW_MULTIPLE, model_mod.patchify_triton = saved[0], saved[1]
        conv_mod.causal_conv1d_silu_triton.__defaults__, norm_mod.launch = saved[2], saved[3]
        block_mod.Block.forward_fused.__defaults__ = saved[4]
        if in_proj_multiple != saved[0]:
            clear_weight_caches()


VARIANTS = {"previous": None, "current": {}, "unfolded": dict(fold_norm=False), "pad8": dict(in_proj_multiple=8),
            "permuted-copy": dict(patchify=False), "wide-norm-tiles": dict(wide_norm_tiles=True)}


def whole_encoder(out, conv, rounds, names, graphs=False, points=((1024, 16, (1, 2, 4, 8)), (2048, 4, (1, 8)))):
    """With `graphs`, each variant is captured once as a CUDA graph and its replays are timed: GPU time without the
    host's launch cost (eager D/8 at 1024 px can be host-bound: the launches take longer than the kernels)."""
    from vision_model.graphs import capture_cuda_graph
    model = create_model("matmamba_vision_135m").to(DEV, DT).eval()
    x = torch.randn(4, 3, 224, 224, device=DEV, dtype=DT)
    with torch.inference_mode():
        for lv in model.config.levels:
            ref = model.embed(x, level=lv, backend="torch").float()
            with setting(model, fold_norm=False):
                unfolded = model.embed(x, level=lv).float()
            out(check="agreement", level=lv, current_vs_torch=rel(model.embed(x, level=lv).float(), ref),
                unfolded_vs_torch=rel(unfolded, ref), previous_vs_torch=rel(embed_previous(model, x, lv).float(), ref))
    variants = [(name, VARIANTS[name]) for name in names]
    if conv:
        variants.append((f"current, conv {conv}", dict(conv=conv)))
    for res, batch, levels in points:
        x = torch.randn(batch, 3, res, res, device=DEV, dtype=DT)
        calls = []
        for lv in levels:
            for name, kw in variants:
                if kw is None:
                    calls.append((dict(level=lv, variant=name), {}, lambda lv=lv: embed_previous(model, x, lv)))
                else:
                    calls.append((dict(level=lv, variant=name), kw, lambda lv=lv: model.embed(x, level=lv)))
        if graphs:
            with torch.inference_mode():
                captured = []
                for desc, kw, call in calls:
                    with setting(model, **kw):
                        captured.append((dict(desc, graph=True), {}, capture_cuda_graph(lambda t, c=call: c(), x)))
            calls = captured
        with torch.inference_mode():
            best = interleaved_best([(lambda kw=kw: setting(model, **kw), call) for _, kw, call in calls], DEV, rounds)
        for i, (desc, _, _) in enumerate(calls):
            out(point=res, batch=batch, **desc, img_s=batch / best[i], ms=best[i] * 1e3)
    x = torch.randn(16, 3, 1024, 1024, device=DEV, dtype=DT)
    for lv in (1, 8):
        with torch.inference_mode():
            table = cuda_kernel_table(lambda: model.embed(x, level=lv))
        print(f"== profile: current, 1024 px, batch 16, level {lv}")
        print(table)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="also append every JSON line to this file")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], choices=["norms", "conv", "gemms", "patchify", "fold", "encoder"])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--graphs", action="store_true", help="time the whole encoder as CUDA graph replays")
    ap.add_argument("--points", nargs="*", metavar="RES:BATCH:LEVELS",
                    help="e.g. 768:16:1,8 (default 1024 px at every level, batch 16, and 2048 px D, D/8, batch 4)")
    args = ap.parse_args()
    sink = open(args.out, "a") if args.out else None
    t0 = time.time()

    def out(**kw):
        print(json.dumps(kw), flush=True)
        if sink:
            sink.write(json.dumps(kw) + "\n")
            sink.flush()

    torch.manual_seed(0)
    if "norms" not in args.skip:
        sweep_norms(out)
        out(at="norms done", s=round(time.time() - t0, 1))
    conv = None
    if "conv" not in args.skip:
        conv = sweep_conv(out)
        out(at="conv done", best=conv, s=round(time.time() - t0, 1))
    if "patchify" not in args.skip:
        sweep_patchify(out)
        out(at="patchify done", s=round(time.time() - t0, 1))
    if "gemms" not in args.skip:
        sweep_gemms(out)
        out(at="gemms done", s=round(time.time() - t0, 1))
    if "fold" not in args.skip:
        sweep_fold(out)
        out(at="fold done", s=round(time.time() - t0, 1))
    if "encoder" not in args.skip:
        points = [(int(r), int(b), tuple(map(int, lv.split(",")))) for r, b, lv in
                  (p.split(":") for p in args.points)] if args.points else None
        whole_encoder(out, conv, args.rounds, args.variants, args.graphs, *([points] if points else []))
    out(at="done", s=round(time.time() - t0, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
