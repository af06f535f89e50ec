"""Causal depthwise conv1d + SiLU over (batch, length, channels) activations: the reference and a Triton kernel.

The block's conv reads the x|B|C slice of in_proj's output, a channels-last view.  `causal_conv1d_silu_ref` is the
readable definition (F.conv1d needs channels-first, so it transposes, pads and crops: three extra passes over the
activations).  `causal_conv1d_silu_triton` reads the strided view in place and writes the activated output in one
pass, with the bias and SiLU fused (inference).  `causal_conv1d_silu_bwd_triton` is its backward: one pass over the
input and the output gradient that recomputes the pre-activation (nothing but the input is saved), writes dx and
reduces dweight and dbias per program; `CausalConv1dSiLU` ties the two into an autograd Function for training.  The
tests hold both to the reference's values and gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import compiler_disabled, tl, triton  # None where Triton cannot run (no GPU, no interpreter)


def causal_conv1d_silu_ref(x: Tensor, weight: Tensor, bias: Tensor | None, row_scale: Tensor | None = None) -> Tensor:
    """x (b, l, c), weight (c, k), bias (c,) -> silu(causal depthwise conv) as (b, l, c); with row_scale (b, l), of
    x * row_scale[..., None]."""
    l, c, k = x.shape[1], weight.shape[0], weight.shape[-1]
    if row_scale is not None:
        x = (x.float() * row_scale.float().unsqueeze(-1)).to(x.dtype)
    y = F.conv1d(x.transpose(1, 2), weight.reshape(c, 1, k), bias, padding=k - 1, groups=c)[..., :l]
    return F.silu(y).transpose(1, 2)


if triton is not None:
    @triton.jit
    def _causal_conv1d_silu_kernel(X, W, Bias, S, Y, L, C, stride_xb, stride_xl, stride_yb, stride_yl,
                                   K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                                   BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_l, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(Bias + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        x_row = X + pid_b * stride_xb
        for j in tl.static_range(K):  # tap j looks K-1-j steps back; before t=0 the input is zero
            src = t - (K - 1) + j
            ok = ((src >= 0) & (src < L))[:, None] & c_ok[None, :]
            xv = tl.load(x_row + src[:, None] * stride_xl + c[None, :], mask=ok, other=0.0).to(tl.float32)
            if HAS_SCALE:  # the row's pre-norm rstd (in_proj read the un-normalised stream)
                xv *= tl.load(S + pid_b * L + src, mask=(src >= 0) & (src < L), other=0.0)[:, None]
            wj = tl.load(W + c * K + j, mask=c_ok, other=0.0).to(tl.float32)
            acc += xv * wj[None, :]
        out = acc * tl.sigmoid(acc)
        y_ptr = Y + pid_b * stride_yb + t[:, None] * stride_yl + c[None, :]
        tl.store(y_ptr, out.to(Y.dtype.element_ty), mask=(t < L)[:, None] & c_ok[None, :])


def causal_conv1d_silu_triton(x: Tensor, weight: Tensor, bias: Tensor | None, row_scale: Tensor | None = None,
                              block_l: int = 32, block_c: int = 128, num_warps: int = 4) -> Tensor:
    """Same contract as the reference; x may be any view whose channel stride is 1 (no copy is made)."""
    if triton is None:
        raise RuntimeError("causal_conv1d_silu_triton needs Triton")
    b, l, c = x.shape
    k = weight.shape[-1]
    if weight.shape[0] != c or (bias is not None and bias.shape != (c,)):
        raise ValueError(f"weight {tuple(weight.shape)} / bias do not match {c} channels")
    if row_scale is not None and row_scale.shape != (b, l):
        raise ValueError(f"row_scale {tuple(row_scale.shape)} does not match ({b}, {l})")
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.reshape(c, k).contiguous()
    y = torch.empty((b, l, c), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(l, block_l), triton.cdiv(c, block_c), b)
    scale = row_scale.float().contiguous() if row_scale is not None else weight
    _causal_conv1d_silu_kernel[grid](x, weight, bias if bias is not None else weight, scale, y, l, c,
                                     x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                                     K=k, HAS_BIAS=bias is not None, HAS_SCALE=row_scale is not None,
                                     BLOCK_L=block_l, BLOCK_C=block_c, num_warps=num_warps)
    return y


if triton is not None:
    @triton.jit
    def _causal_conv1d_silu_bwd_kernel(X, W, Bias, DY, DX, DWp, DBp, Bsz, L, C, stride_xb, stride_xl, stride_dyb,
                                       stride_dyl, stride_dxb, stride_dxl, B_PER_PROGRAM,
                                       K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
        """One program: BLOCK_C channels of B_PER_PROGRAM sequences, walked from the last position to the first.
        With the taps padded in front to four (w0..w3, w3 the current position's) and g = dy * silu'(pre):
        dx[t] = w3 g[t] + w2 g[t+1] + w1 g[t+2] + w0 g[t+3], dw_j += g[t] x[t-3+j], db += g[t]. Walking backwards,
        the three g's after t and the three x's before it are carried in registers, so each position is read once
        (one row of x and one of dy) and written once, with nothing recomputed; dw and db leave as one fp32 partial
        per program, summed outside (deterministic, unlike atomics). The sequential walk keeps a program small (a
        few registers a channel), so many programs run at once and their loads overlap."""
        pid_c, pid_g = tl.program_id(0), tl.program_id(1)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        zero = tl.zeros((BLOCK_C,), dtype=tl.float32)
        c_ok = c < C
        w_row = W + c * K
        w3 = tl.load(w_row + (K - 1), mask=c_ok, other=0.0).to(tl.float32)
        w2 = zero
        w1 = zero
        w0 = zero
        if K >= 2:
            w2 = tl.load(w_row + (K - 2), mask=c_ok, other=0.0).to(tl.float32)
        if K >= 3:
            w1 = tl.load(w_row + (K - 3), mask=c_ok, other=0.0).to(tl.float32)
        if K >= 4:
            w0 = tl.load(w_row + (K - 4), mask=c_ok, other=0.0).to(tl.float32)
        bias = zero
        if HAS_BIAS:
            bias = tl.load(Bias + c, mask=c_ok, other=0.0).to(tl.float32)
        dw0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dw1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dw2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dw3 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        db = tl.zeros((BLOCK_C,), dtype=tl.float32)
        b_start = pid_g.to(tl.int64) * B_PER_PROGRAM
        for i in range(0, B_PER_PROGRAM):
            b = b_start + i
            ok = c_ok & (b < Bsz)  # the last group may run short
            x_row = X + b * stride_xb + c
            dy_row = DY + b * stride_dyb + c
            dx_row = DX + b * stride_dxb + c
            # x at the last three positions (before the walk), g past the end = 0
            a1 = tl.load(x_row + (L - 1) * stride_xl, mask=ok & (L >= 1), other=0.0).to(tl.float32)
            a2 = tl.load(x_row + (L - 2) * stride_xl, mask=ok & (L >= 2), other=0.0).to(tl.float32)
            a3 = tl.load(x_row + (L - 3) * stride_xl, mask=ok & (L >= 3), other=0.0).to(tl.float32)
            g1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
            g2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
            g3 = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for s in range(0, L):
                t = L - 1 - s
                x3 = tl.load(x_row + (t - 3) * stride_xl, mask=ok & (t >= 3), other=0.0).to(tl.float32)
                dy = tl.load(dy_row + t * stride_dyl, mask=ok, other=0.0).to(tl.float32)
                pre = bias + w3 * a1 + w2 * a2 + w1 * a3 + w0 * x3
                sig = tl.sigmoid(pre)
                g = dy * sig * (1.0 + pre * (1.0 - sig))
                dx = w3 * g + w2 * g1 + w1 * g2 + w0 * g3
                tl.store(dx_row + t * stride_dxl, dx.to(DX.dtype.element_ty), mask=ok)
                dw3 += g * a1
                dw2 += g * a2
                dw1 += g * a3
                dw0 += g * x3
                db += g
                g3 = g2
                g2 = g1
                g1 = g
                a1 = a2
                a2 = a3
                a3 = x3
        # the partial's taps in the weight's order: tap j of K is padded tap j + 4 - K
        part = DWp + (pid_g.to(tl.int64) * C + c) * K
        tl.store(part + (K - 1), dw3, mask=c_ok)
        if K >= 2:
            tl.store(part + (K - 2), dw2, mask=c_ok)
        if K >= 3:
            tl.store(part + (K - 3), dw1, mask=c_ok)
        if K >= 4:
            tl.store(part + (K - 4), dw0, mask=c_ok)
        tl.store(DBp + pid_g.to(tl.int64) * C + c, db, mask=c_ok)


def causal_conv1d_silu_bwd_triton(x: Tensor, weight: Tensor, bias: Tensor | None, dy: Tensor, block_c: int = 64,
                                  programs: int | None = None,
                                  num_warps: int = 1) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients (dx, dweight, dbias) of `causal_conv1d_silu_ref(x, weight, bias)` for the output gradient dy.
    x and dy may be any views whose channel stride is 1; dx is a new (b, l, c) tensor of x's dtype, dweight and dbias
    have weight's and bias's shapes and dtypes. `programs` is the number of sequence groups (default: one sequence a
    program); each writes one fp32 partial of dweight and dbias. Kernels of up to 4 taps (Mamba's is 4)."""
    if triton is None:
        raise RuntimeError("causal_conv1d_silu_bwd_triton needs Triton")
    b, l, c = x.shape
    k = weight.shape[-1]
    if dy.shape != x.shape or weight.shape[0] != c or (bias is not None and bias.shape != (c,)):
        raise ValueError(f"conv backward shapes do not match: x {tuple(x.shape)}, dy {tuple(dy.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if not 1 <= k <= 4:
        raise ValueError(f"the Triton conv backward takes 1 to 4 taps, not {k}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    w2 = weight.reshape(c, k).contiguous()
    groups = min(b, programs or b)
    per_program = triton.cdiv(b, groups)
    groups = triton.cdiv(b, per_program)
    dx = torch.empty((b, l, c), dtype=x.dtype, device=x.device)
    dw_part = torch.empty((groups, c, k), dtype=torch.float32, device=x.device)
    db_part = torch.empty((groups, c), dtype=torch.float32, device=x.device)
    _causal_conv1d_silu_bwd_kernel[(triton.cdiv(c, block_c), groups)](
        x, w2, bias if bias is not None else w2, dy, dx, dw_part, db_part, b, l, c, x.stride(0), x.stride(1),
        dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1), per_program, K=k, HAS_BIAS=bias is not None,
        BLOCK_C=block_c, num_warps=num_warps)
    dweight = dw_part.sum(0).reshape(weight.shape).to(weight.dtype)
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


class CausalConv1dSiLU(torch.autograd.Function):
    """silu(causal depthwise conv1d) with both passes in Triton: the forward saves only its inputs (the backward
    recomputes the pre-activation, which costs K multiply-adds a value against writing and reading a copy)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        return causal_conv1d_silu_triton(x, weight, bias)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = causal_conv1d_silu_bwd_triton(x, weight, bias, dy)
        return dx, dweight, dbias


@compiler_disabled
def causal_conv1d_silu_train(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`causal_conv1d_silu_ref(x, weight, bias)` with autograd, forward and backward in Triton."""
    if triton is None:
        raise RuntimeError("causal_conv1d_silu_train needs Triton")
    return CausalConv1dSiLU.apply(x, weight, bias)
