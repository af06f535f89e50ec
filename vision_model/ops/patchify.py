"""The token kernels around the patch GEMM: images to rows of flattened patches, and the per-token table added to
the GEMM's output. The readable definitions (`patchify_ref`, `add_token_table_ref`) and Triton kernels for inference.

The patch embedding is a GEMM over rows of flattened patches, (b, c, H, W) -> (b, H/p * W/p, c * p * p)
(`MatMambaVision._tokens`).  PyTorch makes them with a permuted copy whose reads come in p-element runs, well below
the memory bandwidth.  Here one program copies a band of p image rows of one channel, a block of columns at a time:
reads run along image rows and each patch lands as one contiguous run of p * p values.  The table (positional
embedding, patch bias, CLS token: one row per token) is then added to every image's tokens; PyTorch's broadcast add
is also slow for its bytes, `add_token_table_triton` reads and writes each row once (measurements: docs/notes.md).
"""
from __future__ import annotations

from torch import Tensor

from .rmsnorm import launch as row_launch

from ._triton import tl, triton  # None where Triton cannot run (no GPU, no interpreter)


def patchify_ref(x: Tensor, patch: int, out: Tensor | None = None) -> Tensor:
    """Rows of flattened patches of x (b, c, H, W): (b, H/p * W/p, c * p * p), row-major patches, each patch channel
    by channel. With `out` (b, >= H/p * W/p, c * p * p), written into its first rows (rows past the patches are left
    alone) and out returned."""
    b, c, H, W = x.shape
    if H % patch or W % patch:
        raise ValueError(f"image size {(H, W)} must be a multiple of the patch size {patch}")
    grid = (H // patch, W // patch)
    unfolded = x.reshape(b, c, grid[0], patch, grid[1], patch).permute(0, 2, 4, 1, 3, 5)
    if out is None:
        return unfolded.reshape(b, grid[0] * grid[1], c * patch * patch)
    out[:, :grid[0] * grid[1]].view(b, *grid, c, patch, patch).copy_(unfolded)
    return out


def add_token_table_ref(tokens: Tensor, table: Tensor) -> Tensor:
    """tokens (b, T, d) += table (T, d) for every image, in place; returns tokens."""
    return tokens.add_(table)


if triton is not None:
    @triton.jit
    def _patchify_kernel(X, Out, C, W, grid_w, stride_xb, stride_xc, stride_xh, stride_ob, stride_ol,
                         P: tl.constexpr, BLOCK_W: tl.constexpr):
        band, ch, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        i = tl.arange(0, P)  # row inside the patch
        src_row = X + b * stride_xb + ch * stride_xc + (band * P + i)[:, None] * stride_xh
        for w0 in range(0, W, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            ok = (w < W)[None, :] & (i < P)[:, None]
            v = tl.load(src_row + w[None, :], mask=ok)
            token = band * grid_w + w // P
            col = ch * P * P + i[:, None] * P + (w % P)[None, :]
            tl.store(Out + b * stride_ob + token[None, :] * stride_ol + col, v, mask=ok)

    @triton.jit
    def _add_table_kernel(Out, Table, M, T, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        ok = (rows < M)[:, None] & (cols < N)[None, :]
        out_ptr = Out + rows[:, None] * N + cols[None, :]
        v = tl.load(out_ptr, mask=ok, other=0.0).to(tl.float32)
        v += tl.load(Table + (rows % T)[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr, v.to(Out.dtype.element_ty), mask=ok)


def patchify_triton(x: Tensor, patch: int, out: Tensor) -> Tensor:
    """Write the patch rows of x (b, c, H, W) into out (b, >= H/p * W/p, c * p * p), whose last dim is dense; rows
    past the patches (the CLS row) are left alone. Returns out. Under Triton's CPU interpreter (TRITON_INTERPRET=1)
    it runs on CPU tensors: the tests."""
    if triton is None:
        raise RuntimeError("patchify_triton needs Triton")
    b, c, H, W = x.shape
    if H % patch or W % patch or patch & (patch - 1):
        raise ValueError(f"image size {(H, W)} must be a multiple of the patch size {patch}, a power of two")
    tokens = (H // patch) * (W // patch)
    if out.shape[0] != b or out.shape[1] < tokens or out.shape[2] != c * patch * patch or out.stride(2) != 1:
        raise ValueError(f"patch buffer {tuple(out.shape)} does not fit {tokens} patches of {c * patch * patch}")
    if x.stride(3) != 1:
        x = x.contiguous()
    block_w = max(patch, min(triton.next_power_of_2(W), 4096 // patch))
    _patchify_kernel[(H // patch, c, b)](x, out, c, W, W // patch, x.stride(0), x.stride(1), x.stride(2),
                                        out.stride(0), out.stride(1), P=patch, BLOCK_W=block_w)
    return out


def add_token_table_triton(tokens: Tensor, table: Tensor) -> Tensor:
    """tokens (b, T, d), contiguous, += table (T, d) for every image, in place; returns tokens. Under Triton's CPU
    interpreter (TRITON_INTERPRET=1) it runs on CPU tensors: the tests."""
    if triton is None:
        raise RuntimeError("add_token_table_triton needs Triton")
    if tokens.ndim != 3 or table.shape != tokens.shape[1:] or not tokens.is_contiguous():
        raise ValueError(f"token table {tuple(table.shape)} does not fit contiguous tokens {tuple(tokens.shape)}")
    b, t, d = tokens.shape
    block_m, block_n, warps = row_launch(d)  # the RMSNorm kernel's tiles: a row-wise pass over the same rows
    _add_table_kernel[(triton.cdiv(b * t, block_m),)](tokens, table.contiguous(), b * t, t, d,
                                                      BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return tokens
