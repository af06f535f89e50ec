"""residual += y @ weightᵀ in place: out_proj with the block's residual add, one Triton kernel for narrow widths.

At inference the residual add runs inside out_proj's GEMM (the residual is its C). For the narrow widths that GEMM
is short in K (256 at D/8 of the 135M config) and moves far more bytes than it computes: it reads and writes the
d_model-wide stream. cuBLAS's in-place `addmm_` ran it at ~2.2 TB/s on the H100; this kernel reads each C tile once,
adds the product in fp32 and writes it back (`launch` picks the tile). Wide K stays on cuBLAS (`backends`).
The tests hold it to `torch.addmm` under Triton's CPU interpreter.
"""
from __future__ import annotations

from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: torch.addmm serves them
    triton = None


if triton is not None:
    @triton.jit
    def _addmm_residual_kernel(Y, W, R, M, N, K, stride_ym, stride_wn, stride_rm,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               GROUP_M: tl.constexpr):
        # programs walk GROUP_M row tiles across all column tiles before moving on, so y's tiles stay in L2
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            k_ok = (k + ks) < K
            a = tl.load(Y + rows[:, None] * stride_ym + (k + ks)[None, :], mask=(rows < M)[:, None] & k_ok[None, :],
                        other=0.0)
            b = tl.load(W + cols[None, :] * stride_wn + (k + ks)[:, None], mask=k_ok[:, None] & (cols < N)[None, :],
                        other=0.0)
            acc = tl.dot(a, b, acc)
        r_ptr = R + rows[:, None] * stride_rm + cols[None, :]
        ok = (rows < M)[:, None] & (cols < N)[None, :]
        acc += tl.load(r_ptr, mask=ok, other=0.0).to(tl.float32)
        tl.store(r_ptr, acc.to(R.dtype.element_ty), mask=ok)


def launch(k: int) -> dict:
    """Tile sizes, warps and pipeline stages for a K-long product."""
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)


def addmm_residual_triton(residual: Tensor, y: Tensor, weight: Tensor, config: dict | None = None) -> Tensor:
    """residual (m, n) += y (m, k) @ weight (n, k)ᵀ, in place; y and weight need a dense last dim, the residual
    must be contiguous. Returns the residual. Under Triton's CPU interpreter (TRITON_INTERPRET=1) it runs on CPU
    tensors: the tests."""
    if triton is None:
        raise RuntimeError("addmm_residual_triton needs Triton")
    (m, n), k = residual.shape, y.shape[1]
    if y.shape != (m, k) or weight.shape != (n, k) or not residual.is_contiguous():
        raise ValueError(f"addmm shapes do not match: residual {tuple(residual.shape)} (contiguous), y "
                         f"{tuple(y.shape)}, weight {tuple(weight.shape)}")
    y, weight = (t if t.stride(-1) == 1 else t.contiguous() for t in (y, weight))
    config = dict(config or launch(k))
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    _addmm_residual_kernel[grid](y, weight, residual, m, n, k, y.stride(0), weight.stride(0), residual.stride(0),
                                 **config)
    return residual
