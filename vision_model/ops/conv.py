"""Causal depthwise conv1d + SiLU over (batch, length, channels) activations: the reference and a Triton kernel.

The block's conv reads the x|B|C slice of in_proj's output, a channels-last view.  `causal_conv1d_silu_ref` is the
readable definition (F.conv1d needs channels-first, so it transposes, pads and crops: three extra passes over the
activations).  `causal_conv1d_silu_triton` reads the strided view in place and writes the activated output in one
pass, with the bias and SiLU fused; it is forward-only (inference), and the tests hold it equal to the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the reference is all they need
    triton = None


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
