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


def _segsum(a: Tensor) -> Tensor:
    """a (..., T) -> (..., T, T) with out[i, j] = sum(a[j+1..i]) for j <= i and -inf above the diagonal."""
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~lower, 0)
    out = torch.cumsum(a, dim=-2)
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))
    return out.masked_fill(~keep, float("-inf"))


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                chunk_size: int = 64) -> Tensor:
    b, l, h, p = x.shape
    in_dtype = x.dtype
    # the exponentials and cumulative sums need at least fp32 even when activations are bf16
    work = torch.promote_types(x.dtype, torch.float32)
    x, dt, A, B, C = (t.to(work) for t in (x, dt, A, B, C))
    pad = (-l) % chunk_size
    if pad:
        # dt = 0 past the end: no decay and no input, so padding cannot change earlier outputs (the scan is causal)
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    B, C = _expand_groups(B, h), _expand_groups(C, h)
    c, T = (l + pad) // chunk_size, chunk_size
    x = x.reshape(b, c, T, h, p)
    B = B.reshape(b, c, T, h, -1)
    C = C.reshape(b, c, T, h, -1)
    dt = dt.reshape(b, c, T, h)
    xdt = x * dt[..., None]
    a = (dt * A).permute(0, 3, 1, 2)  # (b, h, c, T)
    a_cum = torch.cumsum(a, dim=-1)

    # 1. inside each chunk: y = (C B^T ∘ L) (x dt), L the decay mask
    L = torch.exp(_segsum(a))  # (b, h, c, T, T)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, xdt)

    # 2. each chunk's final state, from its own inputs only
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, T)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, xdt)

    # 3. carry states across chunks: state entering chunk k = sum_{j<k} decay(j+1..k-1) * states_j
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    chunk_decay = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)[:, :-1]

    # 4. read the entering state out inside each chunk
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(a_cum))

    y = (y_diag + y_off).reshape(b, c * T, h, p)[:, :l]
    x = x.reshape(b, c * T, h, p)[:, :l]
    if D is not None:
        y = y + x * D.to(work)[:, None]
    return y.to(in_dtype)
