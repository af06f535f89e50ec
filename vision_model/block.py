"""The MatMamba2 block: a Mamba2 mixer whose inner dimension is Matryoshka-nested.

Weights are stored exactly as in Mamba2 (in_proj rows ordered z | x | B | C | dt).  A layer run at width w uses
inner = inner_of(w) channels: the first `inner` rows of z and of x, all of B and C (d_state is shared), the first
inner/headdim heads of dt, A and D, the matching x conv channels plus all B/C conv channels, the first `inner`
gated-norm weights and the first `inner` columns of out_proj.  The output is always d_model wide, so every width
writes into the same residual stream.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .ops.backends import (causal_conv1d_silu, current_fusions, gated_rms_norm, layer_norm, norm_linear,
                           resolve_backend, rms_norm, row_rstd, ssd_scan)
from .cache import DerivedTensorCache


# At inference in_proj's output rows are padded to a multiple of this: an odd row count (D/8 of the 135M config has
# 772) sent the GEMM to a slow cuBLAS fallback, and aligned rows also let the conv and the gate read 128-byte aligned
# rows of its output (measurements: docs/notes.md).
IN_PROJ_ROW_MULTIPLE = 64


class MatMamba2(DerivedTensorCache):
    def __init__(self, d_model: int, d_inner: int, d_state: int = 128, d_conv: int = 4, headdim: int = 64,
                 chunk_size: int = 256, dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        if d_inner % headdim:
            raise ValueError(f"d_inner={d_inner} must be a multiple of headdim={headdim}")
        self.d_model, self.d_inner, self.d_state, self.headdim = d_model, d_inner, d_state, headdim
        self.nheads = d_inner // headdim
        self.chunk_size = chunk_size
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * d_state + self.nheads, bias=False)
        conv_dim = d_inner + 2 * d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=True)
        # dt initialised log-uniform in [dt_min, dt_max] through the inverse softplus, as in Mamba2
        # Under a meta-device context (the model loader's: saved weights replace these) this arithmetic runs on the
        # CPU: meta tensors go through decompositions that import torch._dynamo.
        device = "cpu" if torch.empty(0).is_meta else None
        dt = torch.exp(torch.rand(self.nheads, device=device) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads, device=device).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm_weight = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.norm_eps = 1e-5

    # -- nested weight views ------------------------------------------------------------------------------------
    def _in_rows(self, inner: int) -> list[tuple[int, int]]:
        """Row ranges of in_proj (z, x, B and C, dt) that a layer of inner size `inner` uses."""
        D, N, h = self.d_inner, self.d_state, inner // self.headdim
        return [(0, inner), (D, D + inner), (2 * D, 2 * D + 2 * N), (2 * D + 2 * N, 2 * D + 2 * N + h)]

    def nested_weights(self, inner: int) -> dict[str, Tensor]:
        """The weights a layer of inner size `inner` touches, as tensors shaped for a standalone block."""
        if inner == self.d_inner:
            return {n: p for n, p in self.named_parameters()}
        h = inner // self.headdim
        (z0, z1), (x0, x1), (bc0, bc1), (dt0, dt1) = self._in_rows(inner)
        W = self.in_proj.weight
        conv_rows = lambda t: torch.cat([t[:inner], t[self.d_inner:]])  # x channels, then all of B and C
        return {
            "in_proj.weight": torch.cat([W[z0:z1], W[x0:x1], W[bc0:bc1], W[dt0:dt1]]),
            "conv1d.weight": conv_rows(self.conv1d.weight),
            "conv1d.bias": conv_rows(self.conv1d.bias),
            "dt_bias": self.dt_bias[:h], "A_log": self.A_log[:h], "D": self.D[:h],
            "norm_weight": self.norm_weight[:inner],
            "out_proj.weight": self.out_proj.weight[:, :inner],
        }

    def _weights_for(self, inner: int, in_scale: Tensor | None = None) -> dict[str, Tensor]:
        """nested_weights(inner) plus A = -exp(A_log) in fp32, with in_scale (d_model,) folded into in_proj's columns
        (W · diag(in_scale)) when given; cached at inference (computing A is three tiny kernels a layer, plus their
        launch gaps)."""
        if torch.is_grad_enabled() and (self.in_proj.weight.requires_grad
                                        or (in_scale is not None and in_scale.requires_grad)):
            weights = dict(self.nested_weights(inner), A=-torch.exp(self.A_log[:inner // self.headdim].float()))
            if in_scale is not None:
                weights["in_proj.weight"] = weights["in_proj.weight"] * in_scale
            return weights
        # inference: slice once per width and reuse until the parameters change
        def build() -> dict[str, Tensor]:
            weights = {k: v.contiguous() for k, v in self.nested_weights(inner).items()}
            weights["A"] = -torch.exp(weights["A_log"].float())
            W, multiple = weights["in_proj.weight"], IN_PROJ_ROW_MULTIPLE
            if in_scale is not None:
                W = weights["in_proj.weight"] = (W.float() * in_scale.float()).to(W.dtype)
            # zero rows after dt, up to a multiple of IN_PROJ_ROW_MULTIPLE (see there)
            if W.shape[0] % multiple:
                weights["in_proj.weight"] = torch.cat([W, W.new_zeros(-W.shape[0] % multiple, W.shape[1])])
            return weights
        key = (inner, self.in_proj.weight.device, self.in_proj.weight.dtype, in_scale is not None)
        return self.derived(key, (*self.parameters(), *(() if in_scale is None else (in_scale,))), build)

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, u: Tensor, inner: int | None = None, backend: str = "auto") -> Tensor:
        """u (b, l, d_model) -> (b, l, d_model), using the first `inner` channels of this block."""
        y, w = self._mix(u, inner, backend)
        return F.linear(y, w["out_proj.weight"])

    def forward_residual(self, u: Tensor, residual: Tensor, inner: int | None = None, backend: str = "auto",
                         prenorm: nn.RMSNorm | None = None) -> Tensor:
        """residual + forward(u), or with `prenorm`, residual + forward(prenorm(u)) with the norm folded into in_proj
        (see `_mix`); for inference, with the add inside out_proj's GEMM (the residual is its C): one pass over the
        d_model-wide stream fewer than a separate add. u may be the residual itself. Without autograd the residual
        is updated in place (out of place, PyTorch first copies it into the output: one more pass over the stream)."""
        y, w = self._mix(u, inner, backend, prenorm)
        b, l, d = residual.shape
        y, out_w = y.reshape(b * l, -1), w["out_proj.weight"]
        if not residual.dtype == y.dtype == out_w.dtype:  # autocast: out_proj in its dtype, the add promotes
            return residual + F.linear(y, out_w).view(b, l, d)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, residual, out_w))
        if grad or not residual.is_contiguous():
            return torch.addmm(residual.reshape(b * l, d), y, out_w.t()).view(b, l, d)
        residual.view(b * l, d).addmm_(y, out_w.t())
        return residual

    def _mix(self, u: Tensor, inner: int | None, backend: str, prenorm: nn.Module | None = None,
             fold: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """Everything before out_proj: the gated norm's output (b, l, inner), and the weights.

        With `prenorm` (the block's norm) u is the un-normalised stream. With `fold` (inference; RMSNorm, weight w)
        the norm is folded in: in_proj(RMSNorm(u)) = rstd ⊙ (u @ (W·diag(w))ᵀ), one rstd per row. Only the rstd is
        computed (one read of the stream, no normalised copy written), and it is applied where in_proj's output is
        read: the conv's input, dt and the gate. Without `fold` (training) the norm runs on in_proj's input
        (`norm_linear`): folded, autograd would run each rstd product as separate full-width kernels."""
        inner = self.d_inner if inner is None else inner
        if not 0 < inner <= self.d_inner or inner % self.headdim:
            raise ValueError(f"inner={inner} must be a positive multiple of headdim={self.headdim} "
                             f"and at most d_inner={self.d_inner}")
        b, l, _ = u.shape
        backend = resolve_backend(backend, u.device)
        rstd = row_rstd(u, prenorm.eps, backend) if prenorm is not None and fold else None
        w = self._weights_for(inner, prenorm.weight if rstd is not None else None)
        h, N = inner // self.headdim, self.d_state
        if prenorm is not None and not fold:
            zxbcdt = norm_linear(u, prenorm, w["in_proj.weight"], backend)
        else:
            zxbcdt = F.linear(u, w["in_proj.weight"])  # at inference it may carry zero padding rows after dt
        xbc_end = 2 * inner + 2 * N
        if current_fusions().split:  # views either way; under autograd one split has a one-pass backward
            z, xBC, dt, _ = torch.split(zxbcdt, [inner, inner + 2 * N, h, zxbcdt.shape[-1] - xbc_end - h], dim=-1)
        else:
            z, xBC, dt = zxbcdt[..., :inner], zxbcdt[..., inner:xbc_end], zxbcdt[..., xbc_end:xbc_end + h]
        xBC = causal_conv1d_silu(xBC, w["conv1d.weight"], w["conv1d.bias"], backend, row_scale=rstd)
        x, B, C = torch.split(xBC, [inner, N, N], dim=-1)
        y = ssd_scan(x.reshape(b, l, h, self.headdim), dt, w["A"], B.reshape(b, l, 1, N), C.reshape(b, l, 1, N),
                     w["D"], w["dt_bias"], chunk_size=self.chunk_size, backend=backend, dt_scale=rstd)
        y = gated_rms_norm(y.reshape(b, l, inner), z, w["norm_weight"], self.norm_eps, backend, z_scale=rstd)
        return y, w


class Block(nn.Module):
    """Pre-norm residual block: x + drop_path(mixer(norm(x))); the norm is RMSNorm or LayerNorm (`make_norm`)."""

    def __init__(self, d_model: int, d_inner: int, d_state: int, d_conv: int, headdim: int, chunk_size: int,
                 drop_path: float = 0.0, eps: float = 1e-5, norm: str = "rmsnorm"):
        super().__init__()
        self.norm = make_norm(norm, d_model, eps)
        self.mixer = MatMamba2(d_model, d_inner, d_state, d_conv, headdim, chunk_size)
        self.drop_prob = drop_path

    def forward(self, x: Tensor, inner: int | None = None, backend: str = "auto") -> Tensor:
        """The training block: the norm feeds in_proj (fused with it on the triton backend, `norm_linear`)."""
        y, w = self.mixer._mix(x, inner, backend, prenorm=self.norm, fold=False)
        y = F.linear(y, w["out_proj.weight"])
        if self.training and self.drop_prob > 0:
            y = _drop_path()(y, self.drop_prob, True)
        return x + y

    def forward_fused(self, x: Tensor, inner: int | None = None, backend: str = "auto",
                      fold_norm: bool | None = None) -> Tensor:
        """The same block for inference, x + mixer(norm(x)) with the add inside out_proj's GEMM; without autograd x is
        updated in place. Drop-path has no place here, so training with it uses forward(). An RMSNorm is folded into
        in_proj (`MatMamba2._mix`) when fold_norm, by default on the triton backend: there it saves writing a
        normalised copy of the stream, a layer's largest write at high resolution. A LayerNorm (weight
        and bias, the paper's) is computed on its own (`layer_norm`), whatever fold_norm says: folded, its mean
        would be subtracted after in_proj's bf16 rounding, which cancels where the stream's mean is large."""
        backend = resolve_backend(backend, x.device)
        if isinstance(self.norm, nn.LayerNorm):
            normed = layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps, backend)
            return self.mixer.forward_residual(normed, x, inner, backend)
        if backend == "triton" if fold_norm is None else fold_norm:
            return self.mixer.forward_residual(x, x, inner, backend, prenorm=self.norm)
        return self.mixer.forward_residual(rms_norm(x, self.norm.weight, self.norm.eps, backend), x, inner, backend)


def _drop_path():
    """timm's stochastic depth, imported when a block trains with it: a query never needs timm's import, which
    alone outlasts a query."""
    from timm.layers import drop_path
    return drop_path


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The norm of a block or of the model's output: "rmsnorm" (weight) or "layernorm" (weight and bias)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be 'rmsnorm' or 'layernorm', got {kind!r}")
