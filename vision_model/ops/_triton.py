"""Triton, imported where its kernels can run: a CUDA device, or Triton's CPU interpreter (TRITON_INTERPRET, which the
tests set). Elsewhere `triton` and `tl` are None, as on an install without Triton, and the PyTorch references run: a
CPU-only process (a query) skips Triton's import and the set-up of every kernel, a tenth of a second or more."""
from __future__ import annotations

import os

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
