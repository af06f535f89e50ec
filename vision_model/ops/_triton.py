"""Triton, imported where its kernels can run: a CUDA device, or Triton's CPU interpreter (TRITON_INTERPRET, which the
tests set). Elsewhere `triton` and `tl` are None, as on an install without Triton, and the PyTorch references run: a
CPU-only process (a query) skips Triton's import and the set-up of every kernel, a tenth of a second or more."""
from __future__ import annotations

import functools
import os
import sys

import torch


def _usable() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no"):
        return True
    return torch.cuda.device_count() > 0  # NVML where it can: no CUDA initialisation that a fork would inherit


triton = tl = None
if _usable():
    try:
        import triton
        import triton.language as tl
    except ImportError:  # CPU-only installs without Triton: the PyTorch references serve them
        triton = tl = None


def compiler_disabled(fn):
    """`torch.compiler.disable(fn)` (a compiled training block calls the kernels as they are), applied at the first
    call unless torch._dynamo is loaded already: the decorator imports torch._dynamo, which would cost every process
    that imports this module, a query loading a model among them, about a second. Dynamo handles the first call
    inside a compiled region with a graph break."""
    disabled = torch.compiler.disable(fn) if "torch._dynamo" in sys.modules else None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)
    return call
