"""SSD backends behind one call: pure PyTorch (any device, autograd) or mamba-ssm's Triton kernels (CUDA).

`ssd_scan(..., backend="auto")` takes the Triton kernels for CUDA tensors when mamba-ssm imports, else PyTorch.
The choice is made per call, so two models (or two calls) in one process never fight over a global switch.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
import types

import torch
import torch.nn.functional as F
from torch import Tensor

from .ssd import ssd_chunked

BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def triton_chunk_scan():
    """mamba_ssm's fused chunked scan, or None when mamba-ssm (or its Triton) is not importable."""
    try:
        # mamba_ssm 2.3.2's package __init__ imports the Mamba-1 CUDA extension unconditionally; Mamba2's Triton
        # path never uses it, so stand in an empty module when the real one is not installed.
        if "selective_scan_cuda" not in sys.modules and importlib.util.find_spec("selective_scan_cuda") is None:
            sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # ImportError, or Triton failing to initialise without a GPU
        return None
    return mamba_chunk_scan_combined


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown SSD backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_chunk_scan() is not None else "torch"
    if backend == "triton":
        if device.type != "cuda":
            raise RuntimeError("the triton SSD backend needs CUDA tensors; use backend='torch' on CPU")
        if triton_chunk_scan() is None:
            raise RuntimeError("the triton SSD backend needs mamba-ssm: pip install 'matmamba-search[gpu]'")
    return backend


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
             chunk_size: int, backend: str = "auto") -> Tensor:
    """y = SSD(x, softplus(dt + dt_bias), A, B, C) + D x; shapes as in `vision_model.ssd`."""
    backend = resolve_backend(backend, x.device)
    if backend == "triton":
        # the kernels accept some strided layouts but not every one; conv outputs arrive as transposed views
        x, dt, B, C = x.contiguous(), dt.contiguous(), B.contiguous(), C.contiguous()
        return triton_chunk_scan()(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True)
    dt = F.softplus(dt.float() + dt_bias.float()).to(torch.promote_types(dt.dtype, torch.float32))
    return ssd_chunked(x, dt, A, B, C, D, chunk_size=chunk_size)
