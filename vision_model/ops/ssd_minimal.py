"""State-space duality (SSD) scan of Mamba2, in plain PyTorch.

Shapes follow mamba_ssm: x (b, l, h, p), dt (b, l, h) already positive (softplus applied), A (h,) negative,
B and C (b, l, g, n) with h divisible by g, D (h,).  The recurrence, per head:

    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t B_t^T        (p x n)
    y_t     = state_t C_t + D * x_t

`ssd_recurrent` is that loop, step by step: the definition the tests hold the other backends to.
`ssd_chunked` computes the same thing in chunks (quadratic attention-like form inside a chunk, a linear
recurrence over chunk states between them); it runs on any device and supports autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _expand_groups(t: Tensor, nheads: int) -> Tensor:
    """(b, l, g, n) -> (b, l, h, n): each group of heads shares one B/C."""
    g = t.shape[2]
    return t if g == nheads else t.repeat_interleave(nheads // g, dim=2)


def ssd_recurrent(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None) -> Tensor:
    b, l, h, p = x.shape
    B, C = _expand_groups(B, h), _expand_groups(C, h)
    state = x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        state = state * decay[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1)
    return y if D is None else y + x * D[:, None]


def softplus_dt(dt: Tensor, dt_bias: Tensor) -> Tensor:
    """softplus(dt + dt_bias) in at least fp32: the step sizes the scan takes from the block's raw dt."""
    return F.softplus(dt.float() + dt_bias.float()).to(torch.promote_types(dt.dtype, torch.float32))


def _decay_matrix(a_cum: Tensor) -> Tensor:
    """a_cum (..., T) cumulative log-decays -> (..., T, T) with exp(a_cum[i] - a_cum[j]) for j <= i, else 0."""
    T = a_cum.shape[-1]
    diff = a_cum[..., :, None] - a_cum[..., None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=a_cum.device).tril()
    return torch.exp(diff.masked_fill(~causal, float("-inf")))


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                chunk_size: int = 64) -> Tensor:
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    in_dtype = x.dtype
    # the exponentials and cumulative sums need at least fp32 even when activations are bf16
    work = torch.promote_types(x.dtype, torch.float32)
    x, dt, A, B, C = (t.to(work) for t in (x, dt, A, B, C))
    T = min(chunk_size, l)
    pad = (-l) % T
    if pad:
        # dt = 0 past the end: no decay and no input, so padding cannot change earlier outputs (the scan is causal)
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c = (l + pad) // T
    # heads are laid out (group, head-in-group) so each group's B/C serves its heads by broadcasting
    x = x.reshape(b, c, T, g, h // g, p).permute(0, 1, 3, 4, 2, 5)  # (b, c, g, hg, T, p)
    dt = dt.reshape(b, c, T, g, h // g).permute(0, 1, 3, 4, 2)  # (b, c, g, hg, T)
    B = B.reshape(b, c, T, g, n).permute(0, 1, 3, 2, 4)[:, :, :, None]  # (b, c, g, 1, T, n)
    C = C.reshape(b, c, T, g, n).permute(0, 1, 3, 2, 4)[:, :, :, None]
    a_cum = torch.cumsum(dt * A.reshape(g, h // g)[..., None], dim=-1)  # (b, c, g, hg, T)
    xdt = x * dt[..., None]

    # 1. inside each chunk: y = (C B^T o decay) (x dt)
    scores = (C @ B.transpose(-1, -2)) * _decay_matrix(a_cum)  # (b, c, g, hg, T, T)
    y = scores @ xdt

    if c > 1:
        y = y + _from_earlier_chunks(xdt, a_cum, B, C)
    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, c * T, h, p)[:, :l]
    if D is not None:
        x = x.permute(0, 1, 4, 2, 3, 5).reshape(b, c * T, h, p)[:, :l]
        y = y + x * D.to(work)[:, None]
    return y.to(in_dtype)


def _from_earlier_chunks(xdt: Tensor, a_cum: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """The part of each chunk's output carried in by the state from all earlier chunks."""
    # 2. each chunk's final state from its own inputs: sum_s decay(s..end) xdt_s B_s^T  -> (b, c, g, hg, p, n)
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)
    states = (xdt * decay_to_end[..., None]).transpose(-1, -2) @ B

    # 3. state entering chunk k: sum over j < k of states_j decayed through chunks j+1..k-1
    chunk_decay = _decay_matrix(torch.cumsum(F.pad(a_cum[..., -1].movedim(1, -1), (1, 0)), dim=-1))  # (b, g, hg, c+1, c+1)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)  # (b, c+1, g, hg, p, n)
    entering = torch.einsum("bghzc,bcghpn->bzghpn", chunk_decay, states)[:, :-1]

    # 4. read the entering state out inside each chunk
    return (C @ entering.transpose(-1, -2)) * torch.exp(a_cum)[..., None]
