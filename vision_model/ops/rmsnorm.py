"""RMSNorm over the last dim, plain or gated (RMSNorm(y * silu(z)), Mamba2's output norm): the readable PyTorch
definitions (`rms_norm_ref`, `gated_rms_norm_ref`, `row_rstd_ref`), one Triton kernel for inference, and the gated
norm's backward for training (`GatedRMSNorm`).

The block's two norms move a lot of bytes and compute little: a pre-norm that reads and writes the d_model-wide
stream moves as many bytes at every width.  So at inference the block folds the pre-norm's weight into in_proj and
asks this kernel only for each row's rstd (`rms_rstd_triton`: half the bytes), which the conv, dt and the gate apply
to in_proj's output; the gated norm takes that rstd as a scale of z.  One program handles a tile of up to 4 rows
(`launch`); the math runs in fp32, the output has the input's dtype.  The tests hold the kernel to the references.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import compiler_disabled, tl, triton  # None where Triton cannot run (no GPU, no interpreter)


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm(x) * weight over the last dim."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def gated_rms_norm_ref(y: Tensor, z: Tensor, weight: Tensor, eps: float, z_scale: Tensor | None = None) -> Tensor:
    """RMSNorm(y * silu(z)) * weight over the last dim, computed in fp32, returned in y's dtype; z_scale
    (y.shape[:-1]) multiplies each row of z first."""
    if z_scale is not None:
        z = z.float() * z_scale.float().unsqueeze(-1)
    dtype = y.dtype
    y = y.float() * F.silu(z.float())
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(dtype)


def row_rstd_ref(x: Tensor, eps: float) -> Tensor:
    """1 / sqrt(mean(x²) + eps) over the last dim, fp32, shaped x.shape[:-1]: what RMSNorm divides each row by."""
    return torch.rsqrt(x.float().pow(2).mean(-1) + eps)


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(X, Z, ZScale, W, Y, Rstd, M, N, stride_xm, stride_zm, stride_ym, eps,
                         HAS_GATE: tl.constexpr, SCALE_GATE: tl.constexpr, RSTD_ONLY: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        ok = (rows < M)[:, None] & (cols < N)[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_GATE:
            z = tl.load(Z + rows[:, None] * stride_zm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            if SCALE_GATE:  # z came from in_proj of the un-normalised stream: its row's pre-norm rstd
                z = z * tl.load(ZScale + rows, mask=rows < M, other=0.0)[:, None]
            x = x * z * tl.sigmoid(z)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
        if RSTD_ONLY:
            tl.store(Rstd + rows, rstd, mask=rows < M)
        else:
            w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
            y = x * rstd[:, None] * w[None, :]
            tl.store(Y + rows[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


def launch(width: int) -> tuple[int, int, int]:
    """(rows per program, padded width, warps): up to 4 rows and 4096 values a program, 512 values a warp. Narrow
    norms (D/8's) ran faster with small tiles and few warps than with 16 rows; wide ones were near their best at every
    tile tried (docs/notes.md)."""
    block_n = triton.next_power_of_2(width)
    block_m = max(1, min(4, 4096 // block_n))
    return block_m, block_n, max(1, min(4, block_m * block_n // 512))


def _rows(t: Tensor) -> Tensor:
    """t as (rows, N) with a dense last dim: a view where one exists (reshape copies only otherwise)."""
    return (t if t.stride(-1) == 1 else t.contiguous()).reshape(-1, t.shape[-1])


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float, z: Tensor | None = None, z_scale: Tensor | None = None,
                    rows_per_program: int | None = None, num_warps: int | None = None) -> Tensor:
    """RMSNorm(x) * weight, or with z, RMSNorm(x * silu(z)) * weight, over the last dim; x and z may be strided
    views whose last dim is dense (the block's z is a slice of in_proj's output). z_scale (x.shape[:-1], fp32)
    multiplies each row of z first. Returns a new tensor of x's shape and dtype. Under Triton's CPU interpreter
    (TRITON_INTERPRET=1) it runs on CPU tensors: the tests."""
    if triton is None:
        raise RuntimeError("rms_norm_triton needs Triton")
    n = x.shape[-1]
    if (weight.shape != (n,) or (z is not None and z.shape != x.shape)
            or (z_scale is not None and (z is None or z_scale.shape != x.shape[:-1]))):
        raise ValueError(f"RMSNorm shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}"
                         + (f", z {tuple(z.shape)}" if z is not None else "")
                         + (f", z_scale {tuple(z_scale.shape)}" if z_scale is not None else ""))
    x2 = _rows(x)
    z2 = _rows(z) if z is not None else x2
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    scale = z_scale.reshape(-1).float().contiguous() if z_scale is not None else y
    _launch(x2, z2, scale, weight.contiguous(), y, y, eps, HAS_GATE=z is not None, SCALE_GATE=z_scale is not None,
            RSTD_ONLY=False, rows_per_program=rows_per_program, num_warps=num_warps)
    return y.view(x.shape)


def rms_rstd_triton(x: Tensor, eps: float) -> Tensor:
    """1 / sqrt(mean(x²) + eps) of each row, fp32, shaped x.shape[:-1]: the pre-norm folded into in_proj reads the
    stream once and writes no normalised copy of it (`vision_model.block`)."""
    if triton is None:
        raise RuntimeError("rms_rstd_triton needs Triton")
    x2 = _rows(x)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    _launch(x2, x2, rstd, rstd, rstd, rstd, eps, HAS_GATE=False, SCALE_GATE=False, RSTD_ONLY=True)
    return rstd.view(x.shape[:-1])


def _launch(x2, z2, z_scale, weight, y, rstd, eps, rows_per_program=None, num_warps=None, **flags) -> None:
    block_m, block_n, warps = launch(x2.shape[1])
    block_m, warps = rows_per_program or block_m, num_warps or warps
    grid = (triton.cdiv(x2.shape[0], block_m),)
    _rms_norm_kernel[grid](x2, z2, z_scale, weight, y, rstd, x2.shape[0], x2.shape[1], x2.stride(0), z2.stride(0),
                           y.stride(0), eps, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, **flags)


if triton is not None:
    @triton.jit
    def _gated_rms_norm_bwd_kernel(Y, Z, W, DO, DY, DZ, DWp, M, N, stride_ym, stride_zm, stride_dom, eps,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Tiles of BLOCK_M rows, every program_count-th tile from the program's own: with h = y silu(z),
        r = rstd(h) and g = w * dout, dh = r g - h r³ mean(g h); dy = dh silu(z), dz = dh y silu'(z), and
        dw = sum over rows of dout h r, left as one fp32 partial per program (summed outside). h and r are
        recomputed from y and z, which the backward reads anyway: the forward saves nothing else."""
        pid, programs = tl.program_id(0), tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        c_ok = cols < N
        w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for tile in range(pid, tl.cdiv(M, BLOCK_M), programs):
            rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            ok = (rows < M)[:, None] & c_ok[None, :]
            y = tl.load(Y + rows[:, None] * stride_ym + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            z = tl.load(Z + rows[:, None] * stride_zm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            do = tl.load(DO + rows[:, None] * stride_dom + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            gate = z * sig
            h = y * gate
            rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / N + eps)
            g = do * w[None, :]
            mean_gh = tl.sum(g * h, axis=1) / N
            dh = rstd[:, None] * g - h * (rstd * rstd * rstd * mean_gh)[:, None]
            dw += tl.sum(do * h * rstd[:, None], axis=0)
            out = rows[:, None] * N + cols[None, :]
            tl.store(DY + out, (dh * gate).to(DY.dtype.element_ty), mask=ok)
            tl.store(DZ + out, (dh * y * sig * (1.0 + z * (1.0 - sig))).to(DZ.dtype.element_ty), mask=ok)
        tl.store(DWp + pid.to(tl.int64) * N + cols, dw, mask=c_ok)


def gated_rms_norm_bwd_triton(y: Tensor, z: Tensor, weight: Tensor, dout: Tensor, eps: float,
                              rows_per_program: int | None = None, programs: int | None = None,
                              num_warps: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dy, dz, dweight) of `gated_rms_norm_ref(y, z, weight, eps)` for the output gradient dout; y, z and
    dout may be views whose last dim is dense. dy and dz are new tensors of y's and z's shapes and dtypes, dweight
    has weight's. `programs` (default 4,096) each walk every programs-th tile of rows."""
    if triton is None:
        raise RuntimeError("gated_rms_norm_bwd_triton needs Triton")
    n = y.shape[-1]
    if z.shape != y.shape or dout.shape != y.shape or weight.shape != (n,):
        raise ValueError(f"gated RMSNorm backward shapes do not match: y {tuple(y.shape)}, z {tuple(z.shape)}, "
                         f"dout {tuple(dout.shape)}, weight {tuple(weight.shape)}")
    y2, z2, do2 = _rows(y), _rows(z), _rows(dout)
    # one row a tile, 4 warps and 4,096 programs: the fastest launch of a sweep at the issue-28 shape on the H200
    # (docs/notes.md 18.11); more rows a tile spilled registers at 768 wide
    block_m, block_n, warps = rows_per_program or 1, triton.next_power_of_2(n), num_warps or 4
    grid = max(1, min(programs or 4096, triton.cdiv(y2.shape[0], block_m)))
    dy = torch.empty(y2.shape, dtype=y.dtype, device=y.device)
    dz = torch.empty(z2.shape, dtype=z.dtype, device=z.device)
    dw_part = torch.empty((grid, n), dtype=torch.float32, device=y.device)
    _gated_rms_norm_bwd_kernel[(grid,)](y2, z2, weight.contiguous(), do2, dy, dz, dw_part, y2.shape[0], n,
                                        y2.stride(0), z2.stride(0), do2.stride(0), eps, BLOCK_M=block_m,
                                        BLOCK_N=block_n, num_warps=warps)
    return dy.view(y.shape), dz.view(z.shape), dw_part.sum(0).to(weight.dtype)


class GatedRMSNorm(torch.autograd.Function):
    """RMSNorm(y * silu(z)) * weight with both passes in Triton (training): the forward is the inference kernel and
    saves only its inputs; the backward recomputes each row's rstd from them."""

    @staticmethod
    def forward(ctx, y: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(y, z, weight)
        ctx.eps = eps
        return rms_norm_triton(y, weight, eps, z=z)

    @staticmethod
    def backward(ctx, dout: Tensor):
        y, z, weight = ctx.saved_tensors
        dy, dz, dweight = gated_rms_norm_bwd_triton(y, z, weight, dout, ctx.eps)
        return dy, dz, dweight, None


@compiler_disabled
def gated_rms_norm_train(y: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`gated_rms_norm_ref(y, z, weight, eps)` with autograd, forward and backward in Triton."""
    if triton is None:
        raise RuntimeError("gated_rms_norm_train needs Triton")
    return GatedRMSNorm.apply(y, z, weight, eps)
