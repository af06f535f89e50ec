"""The training block's pre-norm fused with in_proj: F.linear(norm(x), W) for RMSNorm (weight) or LayerNorm (weight
and bias) over the last dim, with both passes of the norm in Triton (`NormLinear`, `norm_linear_triton`).

`norm_linear_ref` is the readable definition.  The norm moves many bytes and computes little, so each pass is one
read of its inputs and one write of its outputs, math in fp32:
- the forward (`norm_fwd_triton`) writes the normalised, affine rows once, in the dtype in_proj's matmul takes (the
  autocast dtype under autocast), and each row's rstd (and mean, LayerNorm); the matmul then runs in PyTorch;
- the backward (`norm_bwd_triton`) takes the gradient of the normalised rows (dout @ W, in PyTorch) and writes dx,
  and one fp32 partial of dweight and dbias per program, summed in PyTorch afterwards (deterministic, unlike atomics).
  A program owns one contiguous tile of rows (a grid over the row tiles), walked a few rows at a time so that the
  tile's values never have to sit in registers together.  mamba-ssm's layer-norm backward instead launches one
  program per SM, each walking thousands of rows one after another: too few loads in flight to use the memory's
  bandwidth.
The normalised rows are saved for in_proj's weight gradient rather than recomputed.  The tests hold both passes to
autograd through the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import compiler_disabled, tl, triton  # None where Triton cannot run (no GPU, no interpreter)


def norm_linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None, lin_weight: Tensor, eps: float | None,
                    is_rms: bool) -> Tensor:
    """F.linear(norm(x), lin_weight), norm over the last dim: RMSNorm(x) * weight (bias must be None) or
    LayerNorm(x) * weight + bias. eps None (RMSNorm) means torch.finfo(x.dtype).eps, as in nn.RMSNorm."""
    n = x.shape[-1]
    if is_rms:
        if bias is not None:
            raise ValueError("RMSNorm has no bias")
        normed = F.rms_norm(x, (n,), weight, eps)
    else:
        normed = F.layer_norm(x, (n,), weight, bias, eps)
    return F.linear(normed, lin_weight)


if triton is not None:
    @triton.jit
    def _norm_fwd_kernel(X, W, B, Y, Mean, Rstd, M, N, stride_xm, eps,
                         IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One tile of BLOCK_M rows, each whole (BLOCK_N >= N): y = (x - mean) * rstd * w + b, mean = 0 for RMSNorm.
        Y is dense (rows of N)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        r_ok, c_ok = rows < M, cols < N
        ok = r_ok[:, None] & c_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if IS_RMS:
            xc = x
        else:
            mean = tl.sum(x, axis=1) / N
            tl.store(Mean + rows, mean, mask=r_ok)
            xc = tl.where(ok, x - mean[:, None], 0.0)  # the padded columns must not count in the variance
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        tl.store(Rstd + rows, rstd, mask=r_ok)
        w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(B + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _norm_bwd_kernel(X, DY, W, Mean, Rstd, DX, DWp, DBp, M, N, stride_xm, stride_dym,
                         IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                         STEP_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One tile of BLOCK_M rows, STEP_M at a time. With xhat = (x - mean) * rstd (mean = 0 for RMSNorm) and
        g = dy * w: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (LayerNorm; RMSNorm drops mean(g)); the tile's
        sums of dy * xhat (dweight) and dy (dbias) are stored as this program's partials. mean and rstd come from the
        forward, so the statistics are not recomputed. DX is dense (rows of N)."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        c_ok = cols < N
        w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
        # per-row accumulators, reduced over rows once at the end rather than at every step
        dw = tl.zeros((STEP_M, BLOCK_N), dtype=tl.float32)
        db = tl.zeros((STEP_M, BLOCK_N), dtype=tl.float32)
        first = pid.to(tl.int64) * BLOCK_M
        for start in range(0, BLOCK_M, STEP_M):
            rows = first + start + tl.arange(0, STEP_M)
            r_ok = rows < M
            ok = r_ok[:, None] & c_ok[None, :]
            x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + rows, mask=r_ok, other=0.0)
            if IS_RMS:
                xhat = x * rstd[:, None]
            else:
                mean = tl.load(Mean + rows, mask=r_ok, other=0.0)
                xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
            g = dy * w[None, :]
            c_gx = tl.sum(g * xhat, axis=1) / N
            if IS_RMS:
                dx = (g - xhat * c_gx[:, None]) * rstd[:, None]
            else:
                c_g = tl.sum(g, axis=1) / N
                dx = (g - c_g[:, None] - xhat * c_gx[:, None]) * rstd[:, None]
            tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
            dw += dy * xhat
            if HAS_BIAS:
                db += dy
        part = pid.to(tl.int64) * N + cols
        tl.store(DWp + part, tl.sum(dw, axis=0), mask=c_ok)
        if HAS_BIAS:
            tl.store(DBp + part, tl.sum(db, axis=0), mask=c_ok)


def fwd_launch(width: int) -> tuple[int, int, int]:
    """(rows per program, padded width, warps) of the forward: tiles of up to 2,048 values (16 rows at most) over 4
    warps, 16 fp32 values a thread for each live tile: few registers, so many programs are resident at once."""
    block_n = triton.next_power_of_2(width)
    return max(1, min(16, 2048 // block_n)), block_n, 4


def bwd_launch(width: int) -> tuple[int, int, int, int]:
    """(rows per program, rows per step, padded width, warps) of the backward: 32 rows a program, so the fp32
    partials (one row of N per program, and one for the bias) stay a few percent of the bytes of x, dy and dx; each
    step holds up to 2,048 values of each of x, dy and the two accumulators over 4 warps, 16 fp32 values a thread
    each, so that they stay in registers (the gated norm's backward spilled with wider tiles, `rmsnorm`)."""
    block_n = triton.next_power_of_2(width)
    step = max(1, min(32, 2048 // block_n))
    return 32, step, block_n, 4


def _rows(t: Tensor) -> Tensor:
    """t as (rows, N) with a dense last dim: a view where one exists (reshape copies only otherwise)."""
    return (t if t.stride(-1) == 1 else t.contiguous()).reshape(-1, t.shape[-1])


def norm_fwd_triton(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, is_rms: bool,
                    out_dtype: torch.dtype | None = None,
                    rows_per_program: int | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """(normed, mean, rstd): the normalised, affine rows of x (shape of x, dtype out_dtype, default x's) and each
    row's fp32 mean (None for RMSNorm) and rstd, shaped x.shape[:-1]. x may be a view whose last dim is dense.
    rows_per_program (a power of two) overrides `fwd_launch`'s."""
    if triton is None:
        raise RuntimeError("norm_fwd_triton needs Triton")
    n = x.shape[-1]
    if weight.shape != (n,) or (bias is not None and (is_rms or bias.shape != (n,))):
        raise ValueError(f"{'RMSNorm' if is_rms else 'LayerNorm'} shapes do not match: x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}" + (f", bias {tuple(bias.shape)}" if bias is not None else ""))
    x2 = _rows(x)
    m = x2.shape[0]
    normed = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    mean = None if is_rms else torch.empty(m, dtype=torch.float32, device=x.device)
    block_m, block_n, warps = fwd_launch(n)
    block_m = rows_per_program or block_m
    if m > 0:
        _norm_fwd_kernel[(triton.cdiv(m, block_m),)](
            x2, weight.contiguous(), bias.contiguous() if bias is not None else rstd, normed,
            mean if mean is not None else rstd, rstd, m, n, x2.stride(0), eps, IS_RMS=is_rms,
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    lead = x.shape[:-1]
    return normed.view(x.shape), (mean.view(lead) if mean is not None else None), rstd.view(lead)


def norm_bwd_triton(x: Tensor, dy: Tensor, weight: Tensor, mean: Tensor | None, rstd: Tensor, has_bias: bool,
                    rows_per_program: int | None = None,
                    rows_per_step: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dx, dweight, dbias) of the norm for dy, the gradient of its normalised, affine output; mean None means
    RMSNorm. x and dy may be views whose last dim is dense. dx has x's shape and dtype; dweight (and dbias when
    has_bias) are fp32 of shape (N,), the sums of every program's partial. rows_per_program and rows_per_step
    override `bwd_launch`'s; rows_per_step (a power of two) must divide rows_per_program, or a program's last
    step would reach into the next program's rows."""
    if triton is None:
        raise RuntimeError("norm_bwd_triton needs Triton")
    n = x.shape[-1]
    if dy.shape != x.shape or weight.shape != (n,) or rstd.shape != x.shape[:-1]:
        raise ValueError(f"norm backward shapes do not match: x {tuple(x.shape)}, dy {tuple(dy.shape)}, "
                         f"weight {tuple(weight.shape)}, rstd {tuple(rstd.shape)}")
    block_m, step, block_n, warps = bwd_launch(n)
    block_m = rows_per_program or block_m
    step = min(rows_per_step or step, block_m)
    if block_m % step:
        raise ValueError(f"rows_per_step {step} does not divide rows_per_program {block_m}")
    x2, dy2 = _rows(x), _rows(dy)
    m = x2.shape[0]
    rstd = rstd.reshape(-1).contiguous()
    mean = mean.reshape(-1).contiguous() if mean is not None else None
    programs = triton.cdiv(m, block_m)
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    dw_part = torch.empty((programs, n), dtype=torch.float32, device=x.device)  # every program writes its row
    db_part = torch.empty((programs, n), dtype=torch.float32, device=x.device) if has_bias else None
    if m > 0:
        _norm_bwd_kernel[(programs,)](
            x2, dy2, weight.contiguous(), mean if mean is not None else rstd, rstd, dx, dw_part,
            db_part if db_part is not None else dw_part, m, n, x2.stride(0), dy2.stride(0),
            IS_RMS=mean is None, HAS_BIAS=has_bias, BLOCK_M=block_m, STEP_M=step, BLOCK_N=block_n,
            num_warps=warps)
    return dx.view(x.shape), dw_part.sum(0), (db_part.sum(0) if db_part is not None else None)


class NormLinear(torch.autograd.Function):
    """F.linear(norm(x), lin_weight) with the norm's both passes in Triton and the matmuls in PyTorch. Under
    autocast the normalised rows are written in the autocast dtype and the matmul runs in it, as autocast's F.linear
    would; the forward saves them (in_proj's weight gradient reads them) with each row's mean and rstd."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lin_weight: Tensor, eps: float,
                is_rms: bool) -> Tensor:
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        # the casts below are explicit, so autocast is off inside: it would otherwise recast what is already cast
        with torch.autocast(device_type, enabled=False):
            normed, mean, rstd = norm_fwd_triton(x, weight, bias, eps, is_rms, out_dtype=dtype)
            lin_cast = lin_weight.to(dtype)
            out = F.linear(normed, lin_cast)
        ctx.save_for_backward(x, weight, bias, lin_cast, normed, mean, rstd)  # the weight as the matmul took it
        ctx.lin_dtype = lin_weight.dtype
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        x, weight, bias, lin_cast, normed, mean, rstd = ctx.saved_tensors
        dtype = normed.dtype
        with torch.autocast(dout.device.type, enabled=False):
            dout = dout.to(dtype)
            d_normed = dout @ lin_cast
            d_lin_weight = (dout.reshape(-1, dout.shape[-1]).t() @ normed.reshape(-1, normed.shape[-1]))
            dx, dweight, dbias = norm_bwd_triton(x, d_normed, weight, mean, rstd, has_bias=bias is not None)
        return (dx, dweight.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else None,
                d_lin_weight.to(ctx.lin_dtype), None, None)


@compiler_disabled
def norm_linear_triton(x: Tensor, weight: Tensor, bias: Tensor | None, lin_weight: Tensor, eps: float | None,
                       is_rms: bool) -> Tensor:
    """`norm_linear_ref(x, weight, bias, lin_weight, eps, is_rms)` with autograd, the norm's forward and backward in
    Triton. Under Triton's CPU interpreter (TRITON_INTERPRET=1) it runs on CPU tensors: the tests."""
    if triton is None:
        raise RuntimeError("norm_linear_triton needs Triton")
    if is_rms and bias is not None:
        raise ValueError("RMSNorm has no bias")
    if eps is None:  # nn.RMSNorm's default, as F.rms_norm resolves it
        eps = torch.finfo(x.dtype).eps
    return NormLinear.apply(x, weight, bias, lin_weight, eps, is_rms)
