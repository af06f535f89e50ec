"""The block's kernels behind one switch: pure PyTorch (any device, autograd) or Triton (CUDA).

backend="triton" runs mamba-ssm's chunked SSD scan (training where our one-chunk scan is not preferred: longer
sequences, d_state over 128, head dims over 32, or `short_scan` off; and inference for head shapes our kernel has no
verified launch for) or our one-kernel SSD forward from `vision_model.ops.ssd_triton` (other inference); our RMSNorm
kernels from `vision_model.ops.rmsnorm` (inference, gated and plain; the gated one in training too, mamba-ssm's with
`gated_norm` off); and our fused causal conv + SiLU from `vision_model.ops.conv` (inference, and training with
`conv`). backend="torch" runs the readable PyTorch definitions of all of them (`ssd_minimal`, and the
`*_ref` beside each kernel).
`backend="auto"` takes Triton for CUDA tensors when mamba-ssm imports, else PyTorch.  The choice is made per call,
so two models (or two calls) in one process never fight over a global switch.

Training (autograd) on the triton backend has its own fusions, each of which `train_fusions` can turn off (a context
variable, so it holds for one thread's calls only): the conv's forward and backward in Triton, the pre-norm fused into
in_proj's input (one pass writes the bf16 normalised rows): our kernels from `vision_model.ops.prenorm`, or with
`own_prenorm` off mamba-ssm's layer_norm_linear_fn (which recomputes the rows in its backward instead of saving them,
and whose backward launches one program per SM, each walking thousands of rows), in_proj's output split with one
`torch.split` (its backward is one concatenation, where three slices each zero-fill and copy a full-size gradient),
the stem computed once for every level of a joint step (`training.train`), the reorders between scan orders
backpropagated as a gather by the inverse permutation (autograd's default for indexing zero-fills the gradient and
scatter-adds into it, sorting the indices), the conv stem run on channels-last images (cuDNN's tensor-core
convolutions work in NHWC, so NCHW activations may be transposed in and out around each convolution), the gated
RMSNorm's backward in our kernel (mamba-ssm's launches one program per SM, each walking thousands of rows one after
another); and sequences that fit in one chunk (at most 256 tokens: every vision config up to 224 px) train on our
one-chunk SSD scan from `vision_model.ops.ssd_short` instead of mamba-ssm's chunked one (no state passing; the decay
factored between blocks of tokens, so one C·Bᵀ tile serves every head of a program in one dot; C·Bᵀ recomputed, never
written).
`block=False` restores the earlier training path (the inference block, norm folded into in_proj, with
autograd) to measure against.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.util
import sys
import types

import torch
import torch.nn.functional as F
from torch import Tensor

from .conv import causal_conv1d_silu_ref, causal_conv1d_silu_train, causal_conv1d_silu_triton
from .prenorm import norm_fwd_triton, norm_linear_triton
from .rmsnorm import (gated_rms_norm_ref, gated_rms_norm_train, rms_norm_ref, rms_norm_triton, rms_rstd_triton,
                      row_rstd_ref)
from .ssd_minimal import softplus_dt, ssd_chunked
from .ssd_short import short_scan_preferred, ssd_short_scan
from .ssd_triton import fused_forward_supported, ssd_forward_triton

BACKENDS = ("auto", "torch", "triton")


@dataclasses.dataclass(frozen=True)
class TrainFusions:
    """Which training-time fusions are on (see the module docstring); all on by default."""
    block: bool = True  # training runs Block.forward (pre-norm into in_proj) rather than the inference block
    norm_linear: bool = True  # the pre-norm fused into in_proj's input (triton backend)
    conv: bool = True  # the causal conv + SiLU forward and backward in Triton (triton backend)
    split: bool = True  # one torch.split of in_proj's output instead of three slices
    shared_stem: bool = True  # a joint step computes the stem once for all its levels
    reorder_gather: bool = True  # a scan-order reorder backpropagates as a gather by the inverse permutation
    stem_channels_last: bool = True  # the conv stem trains on channels-last images (no NCHW<->NHWC transposes)
    gated_norm: bool = True  # the gated RMSNorm's forward and backward in our Triton kernels (triton backend)
    short_scan: bool = True  # one chunk (<= 256 tokens), d_state <= 128, head dim <= 32: our one-chunk SSD scan
    # the pre-norm's forward and backward in our Triton kernels; off: mamba-ssm's layer_norm_linear_fn
    own_prenorm: bool = True

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


_FUSIONS: contextvars.ContextVar[TrainFusions] = contextvars.ContextVar("train_fusions", default=TrainFusions())


def current_fusions() -> TrainFusions:
    return _FUSIONS.get()


@contextlib.contextmanager
def train_fusions(**flags: bool):
    """Turn training fusions on or off for the calls inside, e.g. `with train_fusions(conv=False): ...`."""
    unknown = set(flags) - set(TrainFusions.names())
    if unknown:
        raise ValueError(f"unknown training fusion(s) {sorted(unknown)}; known: {TrainFusions.names()}")
    token = _FUSIONS.set(dataclasses.replace(_FUSIONS.get(), **flags))
    try:
        yield _FUSIONS.get()
    finally:
        _FUSIONS.reset(token)


@functools.lru_cache(maxsize=None)
def mamba_ssm_op(module: str, name: str):
    """mamba_ssm.ops.triton.<module>.<name>, or None when mamba-ssm (or its Triton) is not importable."""
    try:
        # mamba_ssm 2.3.2's package __init__ imports the Mamba-1 CUDA extension unconditionally; Mamba2's Triton
        # path never uses it, so stand in an empty module when the real one is not installed.
        if "selective_scan_cuda" not in sys.modules and importlib.util.find_spec("selective_scan_cuda") is None:
            sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
        # torch.compile of a training block (`MatMambaVision.compile_training`) runs these as they are
        return torch.compiler.disable(getattr(importlib.import_module(f"mamba_ssm.ops.triton.{module}"), name))
    except Exception:  # ImportError, or Triton failing to initialise without a GPU
        return None


def triton_chunk_scan():
    """mamba_ssm's fused chunked scan, or None when mamba-ssm is not importable."""
    return mamba_ssm_op("ssd_combined", "mamba_chunk_scan_combined")


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


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
             chunk_size: int, backend: str = "auto", dt_scale: Tensor | None = None) -> Tensor:
    """y = SSD(x, softplus(dt + dt_bias), A, B, C) + D x; shapes as in `vision_model.ops.ssd_minimal`. With dt_scale (b, l),
    dt * dt_scale[..., None] takes dt's place."""
    backend = resolve_backend(backend, x.device)
    if (backend == "triton" and not _needs_grad(x, dt, A, B, C, D, dt_bias)
            and fused_forward_supported(x.shape[3], B.shape[3])):
        # forward only: the state never leaves the chip
        return ssd_forward_triton(x, dt, A, B, C, D, dt_bias, dt_scale=dt_scale)
    if dt_scale is not None:
        dt = (dt.float() * dt_scale.float().unsqueeze(-1)).to(dt.dtype)
    if backend == "triton":
        # the kernels read any layout whose last dim is dense (the split views of the conv output); others copy
        x, dt, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, dt, B, C))
        if (dt_scale is None and current_fusions().short_scan and _needs_grad(x, dt, A, B, C, D, dt_bias)
                and short_scan_preferred(x.shape[1], x.shape[3], B.shape[3])):
            return ssd_short_scan(x, dt, A, B, C, D, dt_bias)  # training, one chunk: no state passing
        return triton_chunk_scan()(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True)
    return ssd_chunked(x, softplus_dt(dt, dt_bias), A, B, C, D, chunk_size=chunk_size)


def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str = "auto",
                       row_scale: Tensor | None = None) -> Tensor:
    """silu(causal depthwise conv1d) of x (b, l, c) with weight (c, 1, k), or of x * row_scale[..., None]: fused
    Triton kernel at inference."""
    backend = resolve_backend(backend, x.device)
    if backend == "triton" and not _needs_grad(x, weight, bias):
        return causal_conv1d_silu_triton(x, weight, bias, row_scale)
    if backend == "triton" and row_scale is None and current_fusions().conv and weight.shape[-1] <= 4:
        # training: both passes in Triton (the backward walks up to four taps)
        return causal_conv1d_silu_train(x, weight, bias)
    return causal_conv1d_silu_ref(x, weight, bias, row_scale)


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, eps: float, backend: str = "auto",
                   z_scale: Tensor | None = None) -> Tensor:
    """`gated_rms_norm_ref` (RMSNorm(y * silu(z)) * weight, z_scale scaling each row of z first) over the last
    (possibly nested) dim: our Triton kernels at inference and in training (`GatedRMSNorm`), mamba-ssm's when
    training with the `gated_norm` fusion off."""
    backend = resolve_backend(backend, y.device)
    if backend == "triton" and not _needs_grad(y, z, weight):
        return rms_norm_triton(y, weight, eps, z=z, z_scale=z_scale)
    if backend == "triton" and z_scale is None and current_fusions().gated_norm:  # training: both passes ours
        return gated_rms_norm_train(y, z, weight, eps)
    if backend == "triton":  # training on CUDA: mamba-ssm's fused norm, which has a backward
        if z_scale is not None:
            z = z.float() * z_scale.float().unsqueeze(-1)
        rmsnorm_fn = mamba_ssm_op("layernorm_gated", "rmsnorm_fn")
        return rmsnorm_fn(y, weight, None, z=z.to(y.dtype), eps=eps, group_size=None, norm_before_gate=False)
    return gated_rms_norm_ref(y, z, weight, eps, z_scale)


def norm_linear(x: Tensor, norm: torch.nn.Module, weight: Tensor, backend: str = "auto") -> Tensor:
    """F.linear(norm(x), weight) for the block's pre-norm (nn.RMSNorm or nn.LayerNorm): on the triton backend with
    autograd, the normalised rows written once in the autocast dtype, by our kernels (`norm_linear_triton`, which
    saves them for the backward) or with `own_prenorm` off by mamba-ssm's layer_norm_linear_fn (which recomputes
    them in the backward)."""
    backend = resolve_backend(backend, x.device)
    fusions = current_fusions()
    fusable = fusions.norm_linear and isinstance(norm, (torch.nn.RMSNorm, torch.nn.LayerNorm))
    if backend == "triton" and fusable and fusions.own_prenorm:
        return norm_linear_triton(x, norm.weight, getattr(norm, "bias", None), weight, norm.eps,
                                  is_rms=isinstance(norm, torch.nn.RMSNorm))
    fused = mamba_ssm_op("layer_norm", "layer_norm_linear_fn") if backend == "triton" else None
    if fused is not None and fusable:
        return fused(x, norm.weight, getattr(norm, "bias", None), weight, None, eps=norm.eps,
                     is_rms_norm=isinstance(norm, torch.nn.RMSNorm))
    return F.linear(norm(x), weight)


def rms_norm(x: Tensor, weight: Tensor, eps: float, backend: str = "auto") -> Tensor:
    """RMSNorm(x) * weight over the last dim: the pre-norm of a block (our Triton kernel at inference)."""
    backend = resolve_backend(backend, x.device)
    if backend == "triton" and not _needs_grad(x, weight):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, backend: str = "auto") -> Tensor:
    """LayerNorm(x) * weight + bias over the last dim: the paper's pre-norm at inference. On the triton backend our
    pre-norm's forward kernel (`prenorm.norm_fwd_triton`): PyTorch's LayerNorm kernel moved the stream at about a
    third of the memory's bandwidth at d_model 768 on the H200 (docs/notes.md 18.14)."""
    backend = resolve_backend(backend, x.device)
    if backend == "triton" and not _needs_grad(x, weight, bias):
        return norm_fwd_triton(x, weight, bias, eps, is_rms=False)[0]
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def row_rstd(x: Tensor, eps: float, backend: str = "auto") -> Tensor:
    """`row_rstd_ref`: what RMSNorm divides each row by (our Triton kernel at inference)."""
    backend = resolve_backend(backend, x.device)
    if backend == "triton" and not _needs_grad(x):
        return rms_rstd_triton(x, eps)
    return row_rstd_ref(x, eps)
