"""The SSD scan of a sequence that fits in one chunk (at most `MAX_LEN` tokens), forward and backward, for training.

With l ≤ one chunk there is no state passing: per head h (A_h < 0, dt already softplus'd, a_t = dt_t A_h, cum its
cumulative sum over t) the scan is masked linear attention with a decay,

    y[m] = Σ_{n≤m} G[m,n] · exp(cum[m] − cum[n]) · dt[n] · x[n]  +  D_h x[m],     G = C Bᵀ (l × l, per group)

`ssd_short_ref` is that formula in PyTorch: `ssd_minimal.ssd_chunked` with the whole sequence in one chunk
(autograd through it is the tests' reference for every gradient). The Triton kernels compute it tile by tile, flash-attention-like: G is recomputed
from C and B (l × d_state each, small and L2-resident) for each tile of rows m and columns n ≤ m and never written to
memory, and one program serves HEADS heads of one group, so a G tile is computed once for all of them. The heads sit
side by side in the columns of one tile, as x is laid out (position, head, channel): the scores of HEADS heads form a
[rows, HEADS·cols] matrix and multiply a block-diagonal [HEADS·cols, HEADS·headdim] tile of x (each head's block on
the diagonal, zeros elsewhere), one 2-D dot for all heads. That spends HEADS times the tensor-core work of the
per-head products, which are small next to the elementwise decay (one exp per score and head); mamba-ssm's chunked
kernels instead read the materialised C·Bᵀ once per head and tile headdim for 64-wide heads, the cost at headdim 16.

Only the inputs are saved for the backward; it recomputes the scores. With S[m,n] = G·exp(cum[m]−cum[n])·dt[n]
(n ≤ m), dS[m,n] = dy[m]·x[n] and Q = dS ∘ S:

    dx[n]  = Σ_m S[m,n] dy[m] + D dy[n]              dD = Σ dy·x
    dG     = Σ_heads dS ∘ exp(..) ∘ dt[n]            dC = dG B,   dB = dGᵀ C
    dcum[t] = Σ_n Q[t,n] − Σ_m Q[m,t]                 (the decay's two ends)
    da[t]  = Σ_{s≥t} dcum[s]                         dA = Σ da·dt
    ddt[n] = da[n]·A + Σ_m dS[m,n] G[m,n] exp(..)    (then through the softplus: · sigmoid(dt_raw + dt_bias))

Two kernels share the pairs (m, n ≤ m) without atomics: one per block of rows (dC, the row sums of Q, and dA and
the dcum part of dt_bias's gradient summed pair by pair: Σ_t da_t·w_t = Σ_{m,n} Q[m,n]·Σ_{n<t≤m} w_t, which the
reverse cumsum would make ill-conditioned), one per block of columns (dx, dB, the column sums of Q and of
dS·G·exp(..), dD); each loops over every head of its group, so dB and dC are summed over heads on chip. A last small
kernel per sequence turns the row and column sums into dcum and its reverse cumsum into ddt (through the softplus).
Requires A ≠ 0 (Mamba2's A = −exp(A_log) is negative).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import compiler_disabled, tl, triton  # None where Triton cannot run (no GPU, no interpreter)
from .ssd_minimal import softplus_dt, ssd_chunked


MAX_LEN = 256  # the longest sequence these kernels take: one chunk


def ssd_short_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None) -> Tensor:
    """y = SSD(x, dt, A, B, C) + D x for l ≤ MAX_LEN: `ssd_minimal.ssd_chunked` with the whole sequence in one chunk,
    which is the masked attention with a decay above; shapes as there (x (b, l, h, p), dt (b, l, h) after the
    softplus, A (h,), B and C (b, l, g, n))."""
    if x.shape[1] > MAX_LEN:
        raise ValueError(f"ssd_short_ref takes at most {MAX_LEN} tokens, got {x.shape[1]}")
    return ssd_chunked(x, dt, A, B, C, D, chunk_size=MAX_LEN)


def ssd_short_scan_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                       dt_bias: Tensor) -> Tensor:
    """`ssd_short_ref` of softplus(dt + dt_bias): what `ssd_short_scan` computes, with autograd."""
    return ssd_short_ref(x, softplus_dt(dt, dt_bias), A, B, C, D)


def short_scan_supported(seqlen: int, headdim: int, d_state: int) -> bool:
    """Whether `ssd_short_scan` takes this shape: one chunk of tokens; head dims and state sizes whose tiles fit."""
    return 1 <= seqlen <= MAX_LEN and headdim <= 128 and d_state <= 256


def short_scan_preferred(seqlen: int, headdim: int, d_state: int) -> bool:
    """Whether training should take `ssd_short_scan` over mamba-ssm's chunked scan for this shape. Measured on the
    H200 (docs/notes.md 18.11, fwd+bwd, bf16): faster at d_state 64 and head dim 16 (145 tokens 1.26x, 37 tokens
    4.2x, 145 tokens at 6 heads 1.75x), slower at d_state 128 (197 tokens, 64 heads: 0.88x), where each program's
    recomputed C·Bᵀ tiles cost twice as much; head dims over 32 unmeasured, and mamba-ssm's tiles suit them."""
    return short_scan_supported(seqlen, headdim, d_state) and d_state <= 64 and headdim <= 32


def _pow2(v: int, least: int = 1) -> int:
    return max(least, 1 << max(0, v - 1).bit_length())


def default_config(seqlen: int, heads_per_group: int, headdim: int) -> dict:
    """The launch for one call, by reasoning (benchmarks/gpu/ssd_short_check.py sweeps the alternatives):
    HEADS·headdim ≈ 64 columns a program, so that the block-diagonal product stays one small tensor-core tile and a
    G tile serves several heads; 32-token blocks (145 tokens: 5 blocks, 15 tile pairs of 32 × 32 against 6 of 64 × 64,
    a third fewer scores, and [32, HEADS, 32] score tiles that fit in registers); 16-token blocks for very short
    sequences."""
    heads = max(1, min(_pow2(heads_per_group), 64 // _pow2(headdim)))
    block = 16 if seqlen <= 16 else 32
    return {"BLOCK": block, "HEADS": heads, "num_warps": 4, "num_stages": 1}


if triton is not None:
    # Names in the kernels are never reused for tensors of another shape: inside a loop Triton would take such a name
    # for a loop-carried value of changing type and refuse to compile (the interpreter would not notice).
    @triton.jit
    def _dt_tile(DT, pos, head, ok, stride_l, stride_h, bias):
        """(softplus(dt + dt_bias), its derivative) in fp32 at positions `pos` of heads `head` (broadcast index
        tensors); 0 where not `ok` (past the end: no input and no decay)."""
        v = tl.load(DT + pos * stride_l + head * stride_h, mask=ok, other=0.0).to(tl.float32) + bias
        dt = tl.where(v <= 20.0, tl.log(1.0 + tl.exp(v)), v)  # softplus, linear where exp would overflow
        return tl.where(ok, dt, 0.0), tl.where(ok, tl.where(v <= 20.0, tl.sigmoid(v), 1.0), 0.0)

    @triton.jit
    def _log_decay_before(DT, stop, head, h_ok, a, bias, L, stride_l, stride_h, BLOCK: tl.constexpr):
        """(Σ_{t<stop} dt_t·A, Σ_{t<stop} softplus'(dt_t + dt_bias)) per head ([HEADS]): where cum (and the
        backward's cumulative softplus slope) start at position `stop`. Summed block by block of BLOCK, in the order
        a program's own running sums take, so that cum of a row and of the same column agree exactly."""
        total = tl.zeros(a.shape, dtype=tl.float32)
        total_slope = tl.zeros(a.shape, dtype=tl.float32)
        for s in range(0, stop, BLOCK):
            t = s + tl.arange(0, BLOCK)
            dt, slope = _dt_tile(DT, t[None, :], head[:, None], h_ok[:, None] & (t < L)[None, :], stride_l,
                                 stride_h, bias[:, None])
            total += tl.sum(dt * a[:, None], axis=1)
            total_slope += tl.sum(slope, axis=1)
        return total, total_slope

    @triton.jit
    def _ssd_short_fwd_kernel(X, DT, A, Bm, Cm, Dskip, DTBias, Y, L, H, P, N, heads_per_group,
                              stride_xb, stride_xl, stride_xh, stride_db, stride_dl, stride_dh,
                              stride_bb, stride_bl, stride_bg, stride_cb, stride_cl, stride_cg,
                              stride_yb, stride_yl, stride_yh,
                              BLOCK: tl.constexpr, HEADS: tl.constexpr, BLOCK_P: tl.constexpr,
                              BLOCK_D: tl.constexpr, HAS_D: tl.constexpr, PRECISION: tl.constexpr):
        """One program: BLOCK rows m of HEADS heads of one group of one sequence; columns n ≤ m block by block."""
        pid_m, pid_h, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        per_group = tl.cdiv(heads_per_group, HEADS)  # programs a group
        group = pid_h // per_group
        first = group * heads_per_group + (pid_h % per_group) * HEADS
        group_end = (group + 1) * heads_per_group
        head = first + tl.arange(0, HEADS)
        h_ok = head < group_end
        a = tl.load(A + head, mask=h_ok, other=0.0).to(tl.float32)
        bias = tl.load(DTBias + head, mask=h_ok, other=0.0).to(tl.float32)
        # x-shaped columns (head k, channel p); block-diagonal rows (head k, position)
        col = tl.arange(0, HEADS * BLOCK_P)
        col_k, col_p = col // BLOCK_P, col % BLOCK_P
        col_head = first + col_k
        col_ok = (col_head < group_end) & (col_p < P)
        row = tl.arange(0, HEADS * BLOCK)
        row_k, row_n = row // BLOCK, row % BLOCK
        d = tl.arange(0, BLOCK_D)
        d_ok = d < N
        start = pid_m * BLOCK
        m = start + tl.arange(0, BLOCK)
        m_ok = m < L

        dt_ptr = DT + pid_b * stride_db
        before, _slope_before = _log_decay_before(dt_ptr, start, head, h_ok, a, bias, L, stride_dl, stride_dh, BLOCK)
        dt_m, _slope_m = _dt_tile(dt_ptr, m[:, None], head[None, :], m_ok[:, None] & h_ok[None, :],
                                  stride_dl, stride_dh, bias[None, :])  # [BLOCK, HEADS]
        cum_m = before[None, :] + tl.cumsum(dt_m * a[None, :], axis=0)
        c_m = tl.load(Cm + pid_b * stride_cb + group * stride_cg + m[:, None] * stride_cl + d[None, :],
                      mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        x_ptr = X + pid_b * stride_xb
        b_ptr = Bm + pid_b * stride_bb + group * stride_bg
        acc = tl.zeros((BLOCK, HEADS * BLOCK_P), dtype=tl.float32)
        done = tl.zeros((HEADS,), dtype=tl.float32)  # Σ dt·A over the columns already visited
        for s in range(0, start + BLOCK, BLOCK):
            n = s + tl.arange(0, BLOCK)
            n_ok = n < L
            dt_n, _slope_n = _dt_tile(dt_ptr, n[None, :], head[:, None], h_ok[:, None] & n_ok[None, :],
                                      stride_dl, stride_dh, bias[:, None])  # [HEADS, BLOCK]
            a_n = dt_n * a[:, None]
            cum_n = done[:, None] + tl.cumsum(a_n, axis=1)
            done += tl.sum(a_n, axis=1)
            b_n = tl.load(b_ptr + n[:, None] * stride_bl + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            g = tl.dot(c_m, tl.trans(b_n), input_precision=PRECISION)  # [BLOCK, BLOCK], shared by the heads
            causal = (m[:, None] >= n[None, :])[:, None, :]
            decay = tl.exp(tl.where(causal, cum_m[:, :, None] - cum_n[None, :, :], float("-inf")))
            scores = g[:, None, :] * decay * dt_n[None, :, :]  # [rows, heads, cols]
            xn = s + row_n
            x_bd = tl.load(x_ptr + xn[:, None] * stride_xl + col_head[None, :] * stride_xh + col_p[None, :],
                           mask=(row_k[:, None] == col_k[None, :]) & (xn < L)[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(tl.reshape(scores, (BLOCK, HEADS * BLOCK)).to(x_bd.dtype), x_bd, acc=acc,
                         input_precision=PRECISION)
        tile_ok = m_ok[:, None] & col_ok[None, :]
        if HAS_D:
            x_m = tl.load(x_ptr + m[:, None] * stride_xl + col_head[None, :] * stride_xh + col_p[None, :],
                          mask=tile_ok, other=0.0)
            acc += tl.load(Dskip + col_head, mask=col_ok, other=0.0).to(tl.float32)[None, :] * x_m.to(tl.float32)
        tl.store(Y + pid_b * stride_yb + m[:, None] * stride_yl + col_head[None, :] * stride_yh + col_p[None, :],
                 acc.to(Y.dtype.element_ty), mask=tile_ok)

    @triton.jit
    def _ssd_short_bwd_rows_kernel(X, DT, A, Bm, Cm, DY, DTBias, DC, RowQ, DApart, SlopePart, L, H, P, N,
                                   heads_per_group,
                                   stride_xb, stride_xl, stride_xh, stride_db, stride_dl, stride_dh,
                                   stride_bb, stride_bl, stride_bg, stride_cb, stride_cl, stride_cg,
                                   stride_yb, stride_yl, stride_yh, stride_gxb, stride_gxl, stride_gxh,
                                   stride_gbb, stride_gbl, stride_gbg,
                                   BLOCK: tl.constexpr, HEADS: tl.constexpr, BLOCK_P: tl.constexpr,
                                   BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        """One program: BLOCK rows m of one (sequence, group), every head of the group HEADS at a time, columns
        n ≤ m. Writes dC of its rows (summed over the group's heads), each head's Σ_n Q[m, n] into RowQ (b, l, h)
        fp32, and per head the sums over its pairs of Q·(Σ_{n<t≤m} dt_t) (its share of dA) and of
        Q·(Σ_{n<t≤m} softplus'_t) into DApart and SlopePart (b, blocks, h).

        Those two are Σ_t da_t·dt_t and Σ_t da_t·softplus'_t, written pair by pair: through the reverse cumsum of
        dcum, the rounding of RowQ and of the column kernel's sums (each Q computed twice, rounded apart) would be
        weighted by cumulative sums up to l·dt and no longer cancel."""
        pid_m, group, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        col = tl.arange(0, HEADS * BLOCK_P)
        col_k, col_p = col // BLOCK_P, col % BLOCK_P
        row = tl.arange(0, HEADS * BLOCK)
        row_k, row_n = row // BLOCK, row % BLOCK
        d = tl.arange(0, BLOCK_D)
        d_ok = d < N
        start = pid_m * BLOCK
        m = start + tl.arange(0, BLOCK)
        m_ok = m < L
        dt_ptr = DT + pid_b * stride_db
        x_ptr = X + pid_b * stride_xb
        dy_ptr = DY + pid_b * stride_yb
        b_ptr = Bm + pid_b * stride_bb + group * stride_bg
        c_m = tl.load(Cm + pid_b * stride_cb + group * stride_cg + m[:, None] * stride_cl + d[None, :],
                      mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        dc = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
        for first in range(group * heads_per_group, (group + 1) * heads_per_group, HEADS):
            head = first + tl.arange(0, HEADS)
            h_ok = head < (group + 1) * heads_per_group
            a = tl.load(A + head, mask=h_ok, other=0.0).to(tl.float32)
            bias = tl.load(DTBias + head, mask=h_ok, other=0.0).to(tl.float32)
            col_head = first + col_k
            col_ok = (col_head < (group + 1) * heads_per_group) & (col_p < P)
            before, before_slope = _log_decay_before(dt_ptr, start, head, h_ok, a, bias, L, stride_dl, stride_dh,
                                                     BLOCK)
            dt_m, slope_m = _dt_tile(dt_ptr, m[:, None], head[None, :], m_ok[:, None] & h_ok[None, :], stride_dl,
                                     stride_dh, bias[None, :])
            cum_m = before[None, :] + tl.cumsum(dt_m * a[None, :], axis=0)
            cum_slope_m = before_slope[None, :] + tl.cumsum(slope_m, axis=0)
            dy_m = tl.load(dy_ptr + m[:, None] * stride_yl + col_head[None, :] * stride_yh + col_p[None, :],
                           mask=m_ok[:, None] & col_ok[None, :], other=0.0)
            row_q = tl.zeros((BLOCK, HEADS), dtype=tl.float32)
            q_span = tl.zeros((BLOCK, HEADS), dtype=tl.float32)  # Σ_n Q·(cum[m] − cum[n])
            q_slope = tl.zeros((BLOCK, HEADS), dtype=tl.float32)  # Σ_n Q·(Σ_{n<t≤m} softplus'_t)
            done = tl.zeros((HEADS,), dtype=tl.float32)
            done_slope = tl.zeros((HEADS,), dtype=tl.float32)
            for s in range(0, start + BLOCK, BLOCK):
                n = s + tl.arange(0, BLOCK)
                n_ok = n < L
                dt_n, slope_n = _dt_tile(dt_ptr, n[None, :], head[:, None], h_ok[:, None] & n_ok[None, :],
                                         stride_dl, stride_dh, bias[:, None])
                a_n = dt_n * a[:, None]
                cum_n = done[:, None] + tl.cumsum(a_n, axis=1)
                done += tl.sum(a_n, axis=1)
                cum_slope_n = done_slope[:, None] + tl.cumsum(slope_n, axis=1)
                done_slope += tl.sum(slope_n, axis=1)
                b_n = tl.load(b_ptr + n[:, None] * stride_bl + d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                              other=0.0)
                g = tl.dot(c_m, tl.trans(b_n), input_precision=PRECISION)
                xn = s + row_n
                x_bd = tl.load(x_ptr + xn[:, None] * stride_xl + col_head[None, :] * stride_xh + col_p[None, :],
                               mask=(row_k[:, None] == col_k[None, :]) & (xn < L)[:, None] & col_ok[None, :],
                               other=0.0)
                ds = tl.reshape(tl.dot(dy_m, tl.trans(x_bd), input_precision=PRECISION), (BLOCK, HEADS, BLOCK))
                causal = (m[:, None] >= n[None, :])[:, None, :]
                span = cum_m[:, :, None] - cum_n[None, :, :]
                decay = tl.exp(tl.where(causal, span, float("-inf")))
                w = ds * decay * dt_n[None, :, :]  # dS·exp(..)·dt[n]: summed over heads it is dG
                # Q off the diagonal (Q[m, m] enters dcum[m] twice with opposite signs), in the column kernel's order
                strict = (m[:, None] > n[None, :])[:, None, :]
                q = tl.where(strict, ds * (g[:, None, :] * decay) * dt_n[None, :, :], 0.0)
                row_q += tl.sum(q, axis=2)
                q_span += tl.sum(q * span, axis=2)
                q_slope += tl.sum(q * (cum_slope_m[:, :, None] - cum_slope_n[None, :, :]), axis=2)
                dc = tl.dot(tl.sum(w, axis=1).to(b_n.dtype), b_n, acc=dc, input_precision=PRECISION)
            tl.store(RowQ + (pid_b * L + m[:, None]) * H + head[None, :], row_q, mask=m_ok[:, None] & h_ok[None, :])
            part = (pid_b * tl.num_programs(0) + pid_m) * H + head
            # cum[m] − cum[n] = A·Σ_{n<t≤m} dt_t
            tl.store(DApart + part, tl.sum(q_span, axis=0) / tl.where(a != 0.0, a, 1.0), mask=h_ok)
            tl.store(SlopePart + part, tl.sum(q_slope, axis=0), mask=h_ok)
        tl.store(DC + pid_b * stride_gbb + group * stride_gbg + m[:, None] * stride_gbl + d[None, :],
                 dc.to(DC.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _ssd_short_bwd_cols_kernel(X, DT, A, Bm, Cm, Dskip, DY, DTBias, DX, DB, Direct, ColQ, DDpart, L, H, P, N,
                                   heads_per_group,
                                   stride_xb, stride_xl, stride_xh, stride_db, stride_dl, stride_dh,
                                   stride_bb, stride_bl, stride_bg, stride_cb, stride_cl, stride_cg,
                                   stride_yb, stride_yl, stride_yh, stride_gxb, stride_gxl, stride_gxh,
                                   stride_gbb, stride_gbl, stride_gbg,
                                   BLOCK: tl.constexpr, HEADS: tl.constexpr, BLOCK_P: tl.constexpr,
                                   BLOCK_D: tl.constexpr, HAS_D: tl.constexpr, PRECISION: tl.constexpr):
        """One program: BLOCK columns n of one (sequence, group), every head of the group HEADS at a time, rows
        m ≥ n. Writes dx and dB of its positions (dB summed over the group's heads), each head's
        Σ_m dS·G·exp(..) into Direct (b, l, h) fp32 and its share of dD into DDpart (b, blocks, h)."""
        pid_n, group, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        col = tl.arange(0, HEADS * BLOCK_P)
        col_k, col_p = col // BLOCK_P, col % BLOCK_P
        row = tl.arange(0, HEADS * BLOCK)
        row_k, row_n = row // BLOCK, row % BLOCK
        d = tl.arange(0, BLOCK_D)
        d_ok = d < N
        start = pid_n * BLOCK
        n = start + tl.arange(0, BLOCK)
        n_ok = n < L
        xn = start + row_n  # the block-diagonal tiles' positions
        dt_ptr = DT + pid_b * stride_db
        x_ptr = X + pid_b * stride_xb
        dy_ptr = DY + pid_b * stride_yb
        c_ptr = Cm + pid_b * stride_cb + group * stride_cg
        b_n = tl.load(Bm + pid_b * stride_bb + group * stride_bg + n[:, None] * stride_bl + d[None, :],
                      mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        db = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
        for first in range(group * heads_per_group, (group + 1) * heads_per_group, HEADS):
            head = first + tl.arange(0, HEADS)
            h_ok = head < (group + 1) * heads_per_group
            a = tl.load(A + head, mask=h_ok, other=0.0).to(tl.float32)
            bias = tl.load(DTBias + head, mask=h_ok, other=0.0).to(tl.float32)
            col_head = first + col_k
            col_ok = (col_head < (group + 1) * heads_per_group) & (col_p < P)
            before, _slope_before = _log_decay_before(dt_ptr, start, head, h_ok, a, bias, L, stride_dl,
                                                      stride_dh, BLOCK)
            dt_n, _slope_n = _dt_tile(dt_ptr, n[None, :], head[:, None], h_ok[:, None] & n_ok[None, :],
                                      stride_dl, stride_dh, bias[:, None])  # [HEADS, BLOCK]
            cum_n = before[:, None] + tl.cumsum(dt_n * a[:, None], axis=1)
            diag_ok = (row_k[:, None] == col_k[None, :]) & (xn < L)[:, None] & col_ok[None, :]
            bd_off = xn[:, None] * stride_xl + col_head[None, :] * stride_xh + col_p[None, :]
            x_bd = tl.load(x_ptr + bd_off, mask=diag_ok, other=0.0)
            dy_bd = tl.load(dy_ptr + xn[:, None] * stride_yl + col_head[None, :] * stride_yh + col_p[None, :],
                            mask=diag_ok, other=0.0)
            dx = tl.zeros((HEADS * BLOCK, HEADS * BLOCK_P), dtype=tl.float32)
            direct = tl.zeros((HEADS, BLOCK), dtype=tl.float32)
            col_q = tl.zeros((HEADS, BLOCK), dtype=tl.float32)
            done = before
            for s in range(start, L, BLOCK):
                m = s + tl.arange(0, BLOCK)
                m_ok = m < L
                dt_m, _slope_m = _dt_tile(dt_ptr, m[:, None], head[None, :], m_ok[:, None] & h_ok[None, :],
                                          stride_dl, stride_dh, bias[None, :])  # [BLOCK, HEADS]
                a_m = dt_m * a[None, :]
                cum_m = done[None, :] + tl.cumsum(a_m, axis=0)
                done += tl.sum(a_m, axis=0)
                c_m = tl.load(c_ptr + m[:, None] * stride_cl + d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                              other=0.0)
                g = tl.dot(c_m, tl.trans(b_n), input_precision=PRECISION)
                dy_m = tl.load(dy_ptr + m[:, None] * stride_yl + col_head[None, :] * stride_yh + col_p[None, :],
                               mask=m_ok[:, None] & col_ok[None, :], other=0.0)
                ds = tl.reshape(tl.dot(dy_m, tl.trans(x_bd), input_precision=PRECISION), (BLOCK, HEADS, BLOCK))
                causal = (m[:, None] >= n[None, :])[:, None, :]
                decay = tl.exp(tl.where(causal, cum_m[:, :, None] - cum_n[None, :, :], float("-inf")))
                ge = g[:, None, :] * decay
                scores = tl.reshape(ge * dt_n[None, :, :], (BLOCK, HEADS * BLOCK))
                dx = tl.dot(tl.trans(scores).to(dy_m.dtype), dy_m, acc=dx, input_precision=PRECISION)
                direct += tl.sum(ds * ge, axis=0)
                strict = (m[:, None] > n[None, :])[:, None, :]
                col_q += tl.sum(tl.where(strict, ds * ge * dt_n[None, :, :], 0.0), axis=0)
                dg = tl.sum(ds * decay * dt_n[None, :, :], axis=1)  # [rows, cols], summed over the heads
                db = tl.dot(tl.trans(dg).to(c_m.dtype), c_m, acc=db, input_precision=PRECISION)
            d_col = tl.zeros((HEADS * BLOCK_P,), dtype=tl.float32)
            if HAS_D:
                d_col = tl.load(Dskip + col_head, mask=col_ok, other=0.0).to(tl.float32)
                dx += d_col[None, :] * dy_bd.to(tl.float32)
            # only the diagonal blocks of dx are a head's own: the masked store writes each (position, head) once
            dx_off = xn[:, None] * stride_gxl + col_head[None, :] * stride_gxh + col_p[None, :]
            tl.store(DX + pid_b * stride_gxb + dx_off, dx.to(DX.dtype.element_ty), mask=diag_ok)
            tl.store(Direct + (pid_b * L + n[None, :]) * H + head[:, None], direct,
                     mask=h_ok[:, None] & n_ok[None, :])
            tl.store(ColQ + (pid_b * L + n[None, :]) * H + head[:, None], col_q,
                     mask=h_ok[:, None] & n_ok[None, :])
            dd = tl.sum(tl.reshape(tl.sum(x_bd.to(tl.float32) * dy_bd.to(tl.float32), axis=0), (HEADS, BLOCK_P)),
                        axis=1)
            tl.store(DDpart + (pid_b * tl.num_programs(0) + pid_n) * H + head, dd, mask=h_ok)
        tl.store(DB + pid_b * stride_gbb + group * stride_gbg + n[:, None] * stride_gbl + d[None, :],
                 db.to(DB.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _ssd_short_bwd_dt_kernel(DT, A, DTBias, RowQ, ColQ, Direct, DDT, DirectPart, L, H,
                                 stride_db, stride_dl, stride_dh, stride_gb, stride_gl, stride_gh,
                                 BLOCK_L: tl.constexpr, HEADS: tl.constexpr):
        """One program: HEADS heads of one sequence, every position. dcum = RowQ − ColQ, da = its reverse cumsum,
        ddt = (da·A + Direct)·softplus' (the raw dt's gradient); each sequence's Σ Direct·softplus' (the direct
        part of dt_bias's gradient; the rest comes pair by pair from the row kernel) into DirectPart (b, h)."""
        pid_h, pid_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        head = pid_h * HEADS + tl.arange(0, HEADS)
        h_ok = head < H
        t = tl.arange(0, BLOCK_L)
        ok = h_ok[:, None] & (t < L)[None, :]
        a = tl.load(A + head, mask=h_ok, other=0.0).to(tl.float32)
        bias = tl.load(DTBias + head, mask=h_ok, other=0.0).to(tl.float32)
        v = tl.load(DT + pid_b * stride_db + t[None, :] * stride_dl + head[:, None] * stride_dh, mask=ok,
                    other=0.0).to(tl.float32) + bias[:, None]
        slope = tl.where(ok, tl.where(v <= 20.0, tl.sigmoid(v), 1.0), 0.0)
        buf = (pid_b * L + t[None, :]) * H + head[:, None]
        direct = tl.load(Direct + buf, mask=ok, other=0.0)
        dcum = tl.load(RowQ + buf, mask=ok, other=0.0) - tl.load(ColQ + buf, mask=ok, other=0.0)
        # Σ_{s≥t} dcum[s] scanned from the end: the total less a forward cumsum loses the small tail sums
        da = tl.cumsum(dcum, axis=1, reverse=True)
        ddt = (da * a[:, None] + direct) * slope
        tl.store(DDT + pid_b * stride_gb + t[None, :] * stride_gl + head[:, None] * stride_gh,
                 ddt.to(DDT.dtype.element_ty), mask=ok)
        tl.store(DirectPart + pid_b * H + head, tl.sum(direct * slope, axis=1), mask=h_ok)


def _check(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, dt_bias: Tensor) -> tuple[int, ...]:
    if triton is None:
        raise RuntimeError("the short SSD scan needs Triton")
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if (dt.shape != (b, l, h) or B.shape != (b, l, g, n) or C.shape != B.shape or h % g or A.shape != (h,)
            or dt_bias.shape != (h,)):
        raise ValueError(f"SSD shapes do not match: x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}, C {tuple(C.shape)}, dt_bias {tuple(dt_bias.shape)}")
    if not short_scan_supported(l, p, n):
        raise ValueError(f"the short SSD scan takes at most {MAX_LEN} tokens, headdim <= 128 and d_state <= 256; "
                         f"got {l} tokens, headdim {p}, d_state {n}")
    return b, l, h, p, g, n


def _layout(config: dict | None, l: int, h: int, g: int, p: int) -> tuple[dict, dict]:
    """(constexprs, launch options) of a config."""
    config = dict(config or default_config(l, h // g, p))
    launch = {k: config.pop(k) for k in ("num_warps", "num_stages") if k in config}
    heads, block = config["HEADS"], config["BLOCK"]
    if heads & (heads - 1) or block & (block - 1) or block < 16:
        raise ValueError(f"HEADS ({heads}) must be a power of two and BLOCK ({block}) a power of two >= 16")
    # at least 16 columns in the block-diagonal dots (tensor-core tiles)
    block_p = max(_pow2(p), 16 // heads)
    return {"BLOCK": block, "HEADS": heads, "BLOCK_P": block_p}, launch


def _dense(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def ssd_short_forward(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, dt_bias: Tensor,
                      config: dict | None = None) -> Tensor:
    """y = SSD(x, softplus(dt + dt_bias), A, B, C) + D x for l ≤ MAX_LEN, in x's dtype; shapes as in
    `vision_model.ops.ssd_minimal`, any layout whose last dim is dense. `config`: {"BLOCK", "HEADS", "num_warps",
    "num_stages"} (default `default_config`)."""
    b, l, h, p, g, n = _check(x, dt, A, B, C, dt_bias)
    x, B, C = (_dense(t) for t in (x, B, C))
    consts, launch = _layout(config, l, h, g, p)
    y = torch.empty((b, l, h, p), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(l, consts["BLOCK"]), g * triton.cdiv(h // g, consts["HEADS"]), b)
    _ssd_short_fwd_kernel[grid](
        x, dt, A.contiguous(), B, C, D if D is not None else A, dt_bias.contiguous(), y, l, h, p, n, h // g,
        *x.stride()[:3], *dt.stride(), *B.stride()[:3], *C.stride()[:3], *y.stride()[:3],
        BLOCK_D=_pow2(n, 16), HAS_D=D is not None, PRECISION=_precision(x), **consts, **launch)
    return y


def _precision(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 inputs: true fp32 dots, not tf32


def ssd_short_backward(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, dt_bias: Tensor,
                       dy: Tensor, config: dict | None = None) -> tuple[Tensor, ...]:
    """Gradients (dx, ddt, dA, dB, dC, dD, ddt_bias) of `ssd_short_forward` for the output gradient dy, each in its
    input's dtype (dD None without D); dt is the raw input (before dt_bias and the softplus)."""
    b, l, h, p, g, n = _check(x, dt, A, B, C, dt_bias)
    x, B, C, dy = (_dense(t) for t in (x, B, C, dy))
    consts, launch = _layout(config, l, h, g, p)
    blocks = triton.cdiv(l, consts["BLOCK"])
    dev = x.device
    dx = torch.empty((b, l, h, p), dtype=x.dtype, device=dev)
    dB = torch.empty((b, l, g, n), dtype=B.dtype, device=dev)
    dC = torch.empty((b, l, g, n), dtype=C.dtype, device=dev)
    row_q = torch.empty((b, l, h), dtype=torch.float32, device=dev)
    direct = torch.empty((b, l, h), dtype=torch.float32, device=dev)
    col_q = torch.empty((b, l, h), dtype=torch.float32, device=dev)
    dd_part = torch.empty((b, blocks, h), dtype=torch.float32, device=dev)
    A32, bias = A.contiguous(), dt_bias.contiguous()
    strides = (*x.stride()[:3], *dt.stride(), *B.stride()[:3], *C.stride()[:3], *dy.stride()[:3], *dx.stride()[:3],
               *dB.stride()[:3])  # dB and dC: the same fresh layout
    common = dict(BLOCK_D=_pow2(n, 16), PRECISION=_precision(x), **consts, **launch)
    dA_part = torch.empty((b, blocks, h), dtype=torch.float32, device=dev)
    slope_part = torch.empty((b, blocks, h), dtype=torch.float32, device=dev)
    _ssd_short_bwd_rows_kernel[(blocks, g, b)](x, dt, A32, B, C, dy, bias, dC, row_q, dA_part, slope_part,
                                               l, h, p, n, h // g,
                                               *strides, **common)
    _ssd_short_bwd_cols_kernel[(blocks, g, b)](x, dt, A32, B, C, D if D is not None else A32, dy, bias, dx, dB,
                                               direct, col_q, dd_part, l, h, p, n, h // g, *strides,
                                               HAS_D=D is not None, **common)
    ddt = torch.empty((b, l, h), dtype=dt.dtype, device=dev)
    direct_part = torch.empty((b, h), dtype=torch.float32, device=dev)
    per_program = min(_pow2(h), 8)
    _ssd_short_bwd_dt_kernel[(triton.cdiv(h, per_program), b)](
        dt, A32, bias, row_q, col_q, direct, ddt, direct_part, l, h, *dt.stride(), *ddt.stride(),
        BLOCK_L=_pow2(l, 16), HEADS=per_program, num_warps=4)
    dD = dd_part.sum((0, 1)).to(D.dtype) if D is not None else None
    dA = dA_part.sum((0, 1))
    dbias = direct_part.sum(0) + A32.float() * slope_part.sum((0, 1))  # Σ (da·A + Direct)·softplus'
    return dx, ddt, dA.to(A.dtype), dB, dC, dD, dbias.to(dt_bias.dtype)


class SSDShortScan(torch.autograd.Function):
    """`ssd_short_scan_ref` with both passes in Triton; only the inputs are saved (the backward recomputes the
    scores)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, fwd_config=None, bwd_config=None):
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias)
        ctx.bwd_config = bwd_config
        return ssd_short_forward(x, dt, A, B, C, D, dt_bias, fwd_config)

    @staticmethod
    def backward(ctx, dy):
        x, dt, A, B, C, D, dt_bias = ctx.saved_tensors
        grads = ssd_short_backward(x, dt, A, B, C, D, dt_bias, dy, ctx.bwd_config)
        return (*grads, None, None)


@compiler_disabled
def ssd_short_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, dt_bias: Tensor,
                   fwd_config: dict | None = None, bwd_config: dict | None = None) -> Tensor:
    """y = SSD(x, softplus(dt + dt_bias), A, B, C) + D x for l ≤ MAX_LEN with autograd, forward and backward in
    Triton (mamba-ssm's `mamba_chunk_scan_combined(..., dt_bias=, dt_softplus=True)` for one chunk)."""
    return SSDShortScan.apply(x, dt, A, B, C, D, dt_bias, fwd_config, bwd_config)
