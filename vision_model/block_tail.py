"""The end of a narrow block in one Triton kernel, for inference: gated RMSNorm -> out_proj -> residual add -> the
next block's RMSNorm.

At D/8 of the 135M config the mixer is 256 channels wide, but the residual stream it writes into stays d_model (1024)
wide at every width: that is what puts every submodel in one embedding space.  Run as separate kernels, the end of a
D/8 block (gated norm, out_proj GEMM reading the residual as its C, the next block's RMSNorm) moved ~0.6 GB a layer
at 1024 px, batch 16.  Here one program takes a tile of rows: it normalises y * silu(z) over the (<= 256) inner
channels in registers, multiplies by out_proj's weight one block of d_model columns at a time, adds the residual,
writes the new residual in place, and keeps the new rows' sums of squares; a second sweep over the same rows (hot in
L2) writes the next block's normalised input.  The inner tile is held whole, so this serves inner widths up to
`MAX_INNER`; wider mixers are compute-bound in out_proj and keep cuBLAS.

Rounding follows the unfused path: the gated norm's output is rounded to the weights' dtype before the GEMM, the
residual sum is formed in fp32 and rounded once.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the unfused path serves them
    triton = None

MAX_INNER = 256
BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES = 64, 128, 4, 1


if triton is not None:
    @triton.jit
    def _block_tail_kernel(Y, Z, NormW, Wout, R, NextW, Normed, M, K, N,
                           stride_ym, stride_zm, stride_wn, stride_rm, stride_om, eps, next_eps,
                           HAS_NEXT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        k = tl.arange(0, BLOCK_K)
        row_ok, k_ok = rows < M, k < K
        tile_ok = row_ok[:, None] & k_ok[None, :]
        y = tl.load(Y + rows[:, None] * stride_ym + k[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        z = tl.load(Z + rows[:, None] * stride_zm + k[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        g = y * z * tl.sigmoid(z)
        rstd = 1.0 / tl.sqrt(tl.sum(g * g, axis=1) / K + eps)
        norm_w = tl.load(NormW + k, mask=k_ok, other=0.0).to(tl.float32)
        a = (g * rstd[:, None] * norm_w[None, :]).to(Wout.dtype.element_ty)
        sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < N
            w = tl.load(Wout + n[None, :] * stride_wn + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            out_ok = row_ok[:, None] & n_ok[None, :]
            r_ptr = R + rows[:, None] * stride_rm + n[None, :]
            r = tl.load(r_ptr, mask=out_ok, other=0.0).to(tl.float32)
            new = (tl.dot(a, w, input_precision=PRECISION) + r).to(R.dtype.element_ty)
            tl.store(r_ptr, new, mask=out_ok)
            if HAS_NEXT:
                new_f = new.to(tl.float32)
                sumsq += tl.sum(new_f * new_f, axis=1)
        if HAS_NEXT:
            tl.debug_barrier()  # the second sweep reads rows that other threads of this program just wrote
            next_rstd = 1.0 / tl.sqrt(sumsq / N + next_eps)
            for n0 in range(0, N, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                n_ok = n < N
                out_ok = row_ok[:, None] & n_ok[None, :]
                r = tl.load(R + rows[:, None] * stride_rm + n[None, :], mask=out_ok, other=0.0).to(tl.float32)
                next_w = tl.load(NextW + n, mask=n_ok, other=0.0).to(tl.float32)
                normed = r * next_rstd[:, None] * next_w[None, :]
                tl.store(Normed + rows[:, None] * stride_om + n[None, :], normed.to(Normed.dtype.element_ty),
                         mask=out_ok)


def block_tail_supported(inner: int) -> bool:
    return triton is not None and inner <= MAX_INNER


def block_tail_triton(y: Tensor, z: Tensor, norm_weight: Tensor, eps: float, out_weight: Tensor, residual: Tensor,
                      next_weight: Tensor | None = None, next_eps: float = 1e-5,
                      config: dict | None = None) -> tuple[Tensor, Tensor | None]:
    """residual += out_proj(RMSNorm(y * silu(z)) * norm_weight), in place; with next_weight, also returns
    RMSNorm(residual) * next_weight (the next block's input), else None.

    y, z (..., inner) with a dense last dim (z may be a slice of in_proj's output); out_weight (d_model, inner);
    residual (..., d_model) contiguous.  `config` overrides BLOCK_M / BLOCK_N / num_warps / num_stages (GPU sweeps).
    Under Triton's CPU interpreter (TRITON_INTERPRET=1) it runs on CPU tensors: the tests."""
    if triton is None:
        raise RuntimeError("block_tail_triton needs Triton")
    k, n = y.shape[-1], residual.shape[-1]
    if (z.shape != y.shape or norm_weight.shape != (k,) or out_weight.shape != (n, k)
            or residual.shape[:-1] != y.shape[:-1] or (next_weight is not None and next_weight.shape != (n,))):
        raise ValueError(f"block tail shapes do not match: y {tuple(y.shape)}, z {tuple(z.shape)}, norm weight "
                         f"{tuple(norm_weight.shape)}, out_proj {tuple(out_weight.shape)}, residual "
                         f"{tuple(residual.shape)}")
    if k > MAX_INNER:
        raise ValueError(f"block_tail_triton holds the inner dim whole: at most {MAX_INNER}, got {k}")
    if not residual.is_contiguous():
        raise ValueError("the residual is updated in place and must be contiguous")
    y2, z2 = (t.reshape(-1, k) if t.stride(-1) == 1 else t.contiguous().view(-1, k) for t in (y, z))
    r2 = residual.view(-1, n)
    out_weight = out_weight if out_weight.stride(-1) == 1 else out_weight.contiguous()
    normed = torch.empty_like(residual) if next_weight is not None else None
    o2 = normed.view(-1, n) if normed is not None else r2
    cfg = {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "num_warps": NUM_WARPS, "num_stages": NUM_STAGES, **(config or {})}
    grid = (triton.cdiv(r2.shape[0], cfg["BLOCK_M"]),)
    _block_tail_kernel[grid](
        y2, z2, norm_weight.contiguous(), out_weight, r2, next_weight if next_weight is not None else norm_weight,
        o2, r2.shape[0], k, n, y2.stride(0), z2.stride(0), out_weight.stride(0), r2.stride(0), o2.stride(0),
        eps, next_eps, HAS_NEXT=next_weight is not None, BLOCK_K=max(16, triton.next_power_of_2(k)),
        PRECISION="ieee" if y.dtype == torch.float32 else "tf32", **cfg)
    return residual, normed
