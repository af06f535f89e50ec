"""Parameters and FLOPs of any MatMamba-Vision submodel (trained level or Mix'n'Match) at any resolution.

FLOPs are 2 x multiply-accumulates of the matrix products and convolutions, and of the SSD in its chunked form
(the form both backends compute); element-wise work (norms, activations, gating, residual adds) is left out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .config import MatMambaVisionConfig


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int

    @property
    def mflops(self) -> float:
        return self.flops / 1e6


def _layer_params(cfg: MatMambaVisionConfig, inner: int) -> int:
    d, N, K, h = cfg.d_model, cfg.d_state, cfg.d_conv, inner // cfg.headdim
    return (_norm_params(cfg)  # pre-norm
            + d * (2 * inner + 2 * N + h)  # in_proj rows: z, x, B, C, dt
            + (inner + 2 * N) * (K + 1)  # depthwise conv weight + bias over x, B, C
            + 3 * h  # dt_bias, A_log, D
            + inner  # gated-norm weight
            + inner * d)  # out_proj columns


def _norm_params(cfg: MatMambaVisionConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" else 1)  # LayerNorm: weight and bias


def ssd_flops(seqlen: int, inner: int, d_state: int, chunk_size: int) -> int:
    T = min(chunk_size, seqlen)
    chunks = math.ceil(seqlen / T)
    per_chunk = (2 * T * T * d_state  # C B^T
                 + 2 * T * T * inner  # (C B^T o L) x, over all heads
                 + 4 * T * d_state * inner)  # chunk states in, states read out
    return chunks * per_chunk + 2 * chunks * d_state * inner  # + passing states between chunks


def _layer_flops(cfg: MatMambaVisionConfig, inner: int, seqlen: int) -> int:
    d, N, K, h = cfg.d_model, cfg.d_state, cfg.d_conv, inner // cfg.headdim
    proj = 2 * seqlen * d * (2 * inner + 2 * N + h) + 2 * seqlen * inner * d
    conv = 2 * seqlen * (inner + 2 * N) * K
    return proj + conv + ssd_flops(seqlen, inner, N, cfg.chunk_size)


def stem_cost(cfg: MatMambaVisionConfig, img_size: int) -> Cost:
    """Parameters and FLOPs of the stem (patch projection, or the conv stem's layers and 1x1 projection)."""
    d, p, c = cfg.d_model, cfg.patch_size, cfg.in_chans
    patches = (img_size // p) ** 2
    if cfg.stem != "conv":
        return Cost(params=c * p * p * d + d * cfg.patch_bias, flops=2 * patches * c * p * p * d)
    params = flops = 0
    size = img_size
    for cout in cfg.stem_channels:  # 3x3 stride-2 conv (no bias) + BatchNorm weight and bias
        size = (size + 1) // 2
        params += c * cout * 9 + 2 * cout
        flops += 2 * size * size * c * cout * 9
        c = cout
    return Cost(params=params + c * d + d, flops=flops + 2 * patches * c * d)


def submodel_cost(cfg: MatMambaVisionConfig, level: int | None = None, widths: Sequence[int] | None = None,
                  img_size: int | None = None, include_head: bool = True) -> Cost:
    """Parameters touched and FLOPs per image of the submodel at `img_size` (default: the trained size)."""
    inners = [cfg.inner_of(w) for w in cfg.resolve_widths(level, widths)]
    img_size = img_size or cfg.img_size
    d, p = cfg.d_model, cfg.patch_size
    patches = (img_size // p) ** 2
    seqlen = patches + 1  # + CLS suffix
    stem = stem_cost(cfg, img_size)
    params = (stem.params
              + (cfg.grid_size ** 2 + cfg.cls_pos) * d + d  # position embedding, CLS token
              + sum(_layer_params(cfg, i) for i in inners)
              + _norm_params(cfg))  # final norm
    flops = stem.flops + sum(_layer_flops(cfg, i, seqlen) for i in inners)
    if include_head:
        params += d * cfg.num_classes + (cfg.num_classes if cfg.head == "linear" else 0)  # cosine: no bias
        flops += 2 * d * cfg.num_classes
    return Cost(params=params, flops=flops)
