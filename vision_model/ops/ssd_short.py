"""The SSD scan of a sequence that fits in one chunk (at most `MAX_LEN` tokens), forward and backward, for training.

With l ≤ one chunk there is no state to pass between chunks: per head h (A_h < 0, dt already softplus'd,
a_t = dt_t A_h, cum its cumulative sum over t) the scan is masked linear attention with a decay,

    y[m] = Σ_{n≤m} G[m,n] · exp(cum[m] − cum[n]) · dt[n] · x[n]  +  D_h x[m],     G = C Bᵀ (l × l, per group)

`ssd_short_ref` is that formula in PyTorch (`ssd_minimal.ssd_chunked` with the whole sequence in one chunk; autograd
through it is the tests' reference for every gradient). The Triton kernels split the sequence into blocks of BLOCK
tokens and factor the decay between blocks: for a row block I and an earlier column block J, with r = cum just
before I (per head),

    exp(cum[m] − cum[n]) = exp(cum[m] − r) · exp(r − cum[n]) = u[m] · w[n],     both exponents ≤ 0 (no overflow)

so the block pair's contribution to every head is u ∘ (G_IJ · (w·dt ∘ x_J)): one dot of the G tile, which the heads
of a group share, with the scaled x of several heads side by side as x is laid out (position, head, channel). No
pairwise exponentials per head and no per-head dots of 16 columns off the diagonal; only the diagonal tiles (m and n
in one block) are computed pairwise, head by head. G tiles are recomputed from C and B (small, L2-resident) and
never written; only the inputs are saved for the backward.

With `FACTOR_DIAG` in the launch config the diagonal tiles factor too, with r = cum at the block's start:
exp(cum[m] − cum[n]) = exp(cum[m] − r) · exp(r − cum[n]), the first ≤ 1, the second ≥ 1 but at most exp(span), span
the block's total decay. A program takes that form only when every one of its heads' spans is at most `DIAG_SPAN`
(nothing can overflow: exp(DIAG_SPAN) times an activation stays far inside bf16's and fp32's range), masks G to the
causal half first, and otherwise falls back to the pairwise loop. Then the forward's and the column backward's
diagonal tiles are one dot for all heads, and the row backward keeps a dot per head only for the decay's gradient.
The forward's default launch factors; the backward's does not (`default_config`).

The backward follows the same split. Besides dx, dB, dC and dD it needs the decay's gradient da[t] (per position and
head): the sum of Q[m,n] = dS[m,n]·S[m,n] (dS[m,n] = dy[m]·x[n]) over the pairs that straddle t (n < t ≤ m).
Computed as the reverse cumsum of row sums less column sums of Q, it cancels: the pairs on one side of t are counted
twice and subtracted, and in bf16 the two sums round apart. So it is summed directly, from four parts that do not
cancel. For t in block I: pairs with m in I and n before I (a suffix sum of row totals), with both in I (pairwise, on
the diagonal tile), with m after I and n in I (a prefix sum of column totals), with m after I and n before I (the
totals of the block pairs that straddle I).

Kernels: a forward; a backward per row block (dC, the first two parts of da, the block-pair totals), one per column
block (dx, dB, dD, the third part, and Σ_m dS·G·exp(..) for dt's direct gradient) and a last per sequence (da, ddt
through the softplus, the sums for dA and dt_bias). Every program serves one block of HEADS heads of one group of
one sequence: dB and dC are summed over the head blocks afterwards (fp32 partials); no atomics, repeats identical.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import compiler_disabled, tl, triton  # None where Triton cannot run (no GPU, no interpreter)
from .ssd_minimal import softplus_dt, ssd_chunked


MAX_LEN = 256  # the longest sequence these kernels take: one chunk
DIAG_SPAN = 40.0  # FACTOR_DIAG: the largest decay across one block (Σ -dt·A) whose diagonal tile is factored


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
    """Whether training should take `ssd_short_scan` over mamba-ssm's chunked scan for this shape: where it was
    measured faster on the H200 (docs/notes.md 18.12, fwd+bwd, bf16: head dim 16 at d_state 64 and 128, 1.6-5x).
    Head dim 32 (two heads a program, the same 64 columns) is taken unmeasured; over 32 mamba-ssm's tiles suit the
    heads better."""
    return short_scan_supported(seqlen, headdim, d_state) and d_state <= 128 and headdim <= 32


def _pow2(v: int, least: int = 1) -> int:
    return max(least, 1 << max(0, v - 1).bit_length())


def default_config(seqlen: int, heads_per_group: int, headdim: int, factor_diag: bool = False) -> dict:
    """32-token blocks; HEADS·headdim ≈ 64 columns a program (the shared dot's width): every program of the
    forward and the backward serves one block of HEADS heads, so a small block keeps registers free and the grid
    wide. The forward's default factors the diagonal tiles (`factor_diag`), the backward's does not: on the H200 the
    factored forward ran 1.2-1.9x faster at the same errors, while the factored backward saved little and doubled
    the bf16 error of the decay's gradient (docs/notes.md 18.14)."""
    heads = max(1, min(_pow2(heads_per_group), 64 // _pow2(headdim)))
    block = 16 if seqlen <= 16 else 32
    return {"BLOCK": block, "HEADS": heads, "FACTOR_DIAG": factor_diag, "num_warps": 4, "num_stages": 1}


if triton is not None:
    # Names in the kernels are never reused for tensors of another shape inside a loop: Triton would take such a name
    # for a loop-carried value of changing type and refuse to compile (the interpreter would not notice).
    @triton.jit
    def _dt_load(DT, pos, head, ok, stride_l, stride_h, bias):
        """(softplus(dt + dt_bias), its derivative) in fp32; 0 where not `ok`."""
        v = tl.load(DT + pos * stride_l + head * stride_h, mask=ok, other=0.0).to(tl.float32) + bias
        dt = tl.where(v <= 20.0, tl.log(1.0 + tl.exp(v)), v)
        return tl.where(ok, dt, 0.0), tl.where(ok, tl.where(v <= 20.0, tl.sigmoid(v), 1.0), 0.0)

    @triton.jit
    def _widen(v, BP: tl.constexpr):
        """[R, HEADS] -> [R, HEADS·BP]: each head's value over its BP channels (x's column layout)."""
        r: tl.constexpr = v.shape[0]
        k: tl.constexpr = v.shape[1]
        return tl.reshape(tl.broadcast_to(v[:, :, None], (r, k, BP)), (r, k * BP))

    @triton.jit
    def _scaled(t, s, BP: tl.constexpr):
        """t [R, HEADS·BP] times each head's s [R, HEADS], rounded back to t's dtype: a dot's operand."""
        return (t.to(tl.float32) * _widen(s, BP)).to(t.dtype)

    @triton.jit
    def _per_head(t, HEADS: tl.constexpr, BP: tl.constexpr):
        """[R, HEADS·BP] -> [R, HEADS]: the sum over each head's channels."""
        r: tl.constexpr = t.shape[0]
        return tl.sum(tl.reshape(t, (r, HEADS, BP)), axis=2)

    @triton.jit
    def _head_block(pid_h, hblocks, heads_per_group, A, DTBias, P, stride_h, HEADS: tl.constexpr, BP: tl.constexpr):
        """The HEADS heads of program column pid_h (hblocks of them a group): (group, first head, end of the group,
        head index in the block, heads, valid, A and dt_bias of each, and x's columns: the head of each column, its
        channel, valid, offset)."""
        group = pid_h // hblocks
        first = group * heads_per_group + (pid_h % hblocks) * HEADS
        end = (group + 1) * heads_per_group
        k = tl.arange(0, HEADS)
        head = first + k
        h_ok = head < end
        a = tl.load(A + head, mask=h_ok, other=0.0).to(tl.float32)
        bias = tl.load(DTBias + head, mask=h_ok, other=0.0).to(tl.float32)
        col = tl.arange(0, HEADS * BP)
        col_k, col_p = col // BP, col % BP
        col_ok = (first + col_k < end) & (col_p < P)
        return group, first, end, k, head, h_ok, a, bias, col_k, col_p, col_ok, (first + col_k) * stride_h + col_p

    @triton.jit
    def _diagonal_decay(DT, A, DTBias, pos, pos_ok, head, end, causal, stride_l, stride_h):
        """One head's pairwise decay exp(cum[m] − cum[n]) on a diagonal tile (0 above the diagonal) and its dt."""
        ok = head < end
        a = tl.load(A + head, mask=ok, other=0.0).to(tl.float32)
        bias = tl.load(DTBias + head, mask=ok, other=0.0).to(tl.float32)
        dt, _slope = _dt_load(DT, pos, head, pos_ok & ok, stride_l, stride_h, bias)
        cs = tl.cumsum(dt * a, axis=0)
        return tl.exp(tl.where(causal, cs[:, None] - cs[None, :], float("-inf"))), dt

    @triton.jit
    def _diagonal_factorable(cs, DIAG_SPAN: tl.constexpr):
        """Whether a block's diagonal tile may be factored for every head: cs [BLOCK, HEADS] is cum − r (≤ 0)."""
        return tl.max(tl.max(-cs, axis=1), axis=0) <= DIAG_SPAN

    @triton.jit
    def _fwd_diagonal_pairwise(acc, g, causal, x_m, dt_ptr, A, DTBias, m, m_ok, first, end, col_k, stride_dl,
                               stride_dh, HEADS: tl.constexpr, PRECISION: tl.constexpr):
        """acc + the diagonal tile, head by head: a head's scores times x with only that head's columns."""
        for kk in tl.static_range(HEADS):
            e, dt_k = _diagonal_decay(dt_ptr, A, DTBias, m, m_ok, first + kk, end, causal, stride_dl, stride_dh)
            s = g * e * dt_k[None, :]
            acc = tl.dot(s.to(x_m.dtype), tl.where((col_k == kk)[None, :], x_m, 0.0), acc=acc,
                         input_precision=PRECISION)
        return acc

    @triton.jit
    def _rows_diagonal(da, g_mm, causal, dy_m, x_m, dyu_m, xw_m, dt_ptr, A, DTBias, m, m_ok, first, end, col_k, k,
                       stride_dl, stride_dh, BLOCK: tl.constexpr, HEADS: tl.constexpr, FACTORED: tl.constexpr,
                       PRECISION: tl.constexpr):
        """(da + the pairs inside the block, dG of the diagonal tile summed over the heads), head by head. Each head's
        w = dS·exp(cum[m] − cum[n])·dt[n] comes pairwise, or FACTORED from dy·exp(cum[m] − r) (dyu_m) against
        x·exp(r − cum[n])·dt (xw_m)."""
        dg_mm = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for kk in tl.static_range(HEADS):
            if FACTORED:
                w_k = tl.dot(tl.where((col_k == kk)[None, :], dyu_m, 0.0), tl.trans(xw_m), input_precision=PRECISION)
                w_k = tl.where(causal, w_k, 0.0)
            else:
                e, dt_k = _diagonal_decay(dt_ptr, A, DTBias, m, m_ok, first + kk, end, causal, stride_dl,
                                          stride_dh)
                ds = tl.dot(tl.where((col_k == kk)[None, :], dy_m, 0.0), tl.trans(x_m), input_precision=PRECISION)
                w_k = ds * e * dt_k[None, :]
            dg_mm += w_k
            q = w_k * g_mm
            # pairs inside I: Σ_{m ≥ t} Σ_{n < t} Q[m, n]
            before_t = tl.cumsum(q, axis=1) - q
            da_k = tl.sum(tl.where(causal, before_t, 0.0), axis=0)
            da += tl.where((k == kk)[None, :], da_k[:, None], 0.0)
        return da, dg_mm

    @triton.jit
    def _cols_diagonal_pairwise(z, g_nn, causal, x_n, dy_n, dt_ptr, A, DTBias, n, n_ok, first, end, col_k,
                                stride_dl, stride_dh, BLOCK: tl.constexpr, HEADS: tl.constexpr,
                                PRECISION: tl.constexpr):
        """(z + the diagonal tile's Σ_m G·exp(..)·dy, dG of the tile summed over the heads), head by head."""
        dg_nn = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for kk in tl.static_range(HEADS):
            e, dt_k = _diagonal_decay(dt_ptr, A, DTBias, n, n_ok, first + kk, end, causal, stride_dl,
                                      stride_dh)  # [m, n]
            dy_k = tl.where((col_k == kk)[None, :], dy_n, 0.0)
            z = tl.dot(tl.trans(g_nn * e).to(dy_n.dtype), dy_k, acc=z, input_precision=PRECISION)
            ds = tl.dot(dy_k, tl.trans(x_n), input_precision=PRECISION)
            dg_nn += ds * e * dt_k[None, :]
        return z, dg_nn

    @triton.jit
    def _ssd_short_fwd_kernel(X, DT, A, Bm, Cm, Dskip, DTBias, Y, L, P, N, heads_per_group, hblocks,
                              stride_xb, stride_xl, stride_xh, stride_db, stride_dl, stride_dh,
                              stride_bb, stride_bl, stride_bg, stride_cb, stride_cl, stride_cg,
                              stride_yb, stride_yl, stride_yh,
                              BLOCK: tl.constexpr, HEADS: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
                              FACTOR_DIAG: tl.constexpr, DIAG_SPAN: tl.constexpr, HAS_D: tl.constexpr,
                              PRECISION: tl.constexpr):
        """One program: rows m of block I for HEADS heads of one group of one sequence."""
        pid_m, pid_h, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        group, first, end, k, head, h_ok, a, bias, col_k, col_p, col_ok, col_off = _head_block(
            pid_h, hblocks, heads_per_group, A, DTBias, P, stride_xh, HEADS, BP)
        d = tl.arange(0, BD)
        d_ok = d < N
        start = pid_m * BLOCK
        m = start + tl.arange(0, BLOCK)
        m_ok = m < L
        dt_ptr = DT + pid_b * stride_db
        x_ptr = X + pid_b * stride_xb
        b_ptr = Bm + pid_b * stride_bb + group * stride_bg
        c_m = tl.load(Cm + pid_b * stride_cb + group * stride_cg + m[:, None] * stride_cl + d[None, :],
                      mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.zeros((BLOCK, HEADS * BP), dtype=tl.float32)
        tail = tl.zeros((HEADS,), dtype=tl.float32)  # Σ dt·A over the blocks between J and I
        for back in range(0, pid_m):  # earlier blocks J, nearest first
            n = (pid_m - 1 - back) * BLOCK + tl.arange(0, BLOCK)
            dt_n, _s = _dt_load(dt_ptr, n[:, None], head[None, :], h_ok[None, :] & (n < L)[:, None], stride_dl,
                                stride_dh, bias[None, :])
            a_n = dt_n * a[None, :]
            w = tl.exp(tl.cumsum(a_n, axis=0, reverse=True) - a_n + tail[None, :]) * dt_n  # exp(r − cum[n])·dt
            tail += tl.sum(a_n, axis=0)
            x_n = tl.load(x_ptr + n[:, None] * stride_xl + col_off[None, :], mask=col_ok[None, :], other=0.0)
            xw = _scaled(x_n, w, BP)
            b_n = tl.load(b_ptr + n[:, None] * stride_bl + d[None, :], mask=d_ok[None, :], other=0.0)
            g = tl.dot(c_m, tl.trans(b_n), input_precision=PRECISION)
            acc = tl.dot(g.to(x_n.dtype), xw, acc=acc, input_precision=PRECISION)
        dt_m, _s = _dt_load(dt_ptr, m[:, None], head[None, :], m_ok[:, None] & h_ok[None, :], stride_dl, stride_dh,
                            bias[None, :])
        cs_m = tl.cumsum(dt_m * a[None, :], axis=0)  # cum[m] − r
        x_m = tl.load(x_ptr + m[:, None] * stride_xl + col_off[None, :], mask=m_ok[:, None] & col_ok[None, :],
                      other=0.0)
        b_m = tl.load(b_ptr + m[:, None] * stride_bl + d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        g = tl.dot(c_m, tl.trans(b_m), input_precision=PRECISION)
        causal = m[:, None] >= m[None, :]
        if FACTOR_DIAG:
            if _diagonal_factorable(cs_m, DIAG_SPAN):
                # the diagonal tile like the others: G (causal half) times x scaled by exp(r − cum[n])·dt, all heads
                xw_m = _scaled(x_m, tl.exp(-cs_m) * dt_m, BP)
                acc = tl.dot(tl.where(causal, g, 0.0).to(x_m.dtype), xw_m, acc=acc, input_precision=PRECISION)
                acc = acc * _widen(tl.exp(cs_m), BP)  # · exp(cum[m] − r)
            else:
                acc = acc * _widen(tl.exp(cs_m), BP)
                acc = _fwd_diagonal_pairwise(acc, g, causal, x_m, dt_ptr, A, DTBias, m, m_ok, first, end, col_k,
                                             stride_dl, stride_dh, HEADS, PRECISION)
        else:
            acc = acc * _widen(tl.exp(cs_m), BP)
            acc = _fwd_diagonal_pairwise(acc, g, causal, x_m, dt_ptr, A, DTBias, m, m_ok, first, end, col_k,
                                         stride_dl, stride_dh, HEADS, PRECISION)
        tile_ok = m_ok[:, None] & col_ok[None, :]
        if HAS_D:
            acc += tl.load(Dskip + first + col_k, mask=col_ok, other=0.0).to(tl.float32)[None, :] * x_m.to(tl.float32)
        tl.store(Y + pid_b * stride_yb + m[:, None] * stride_yl + ((first + col_k) * stride_yh + col_p)[None, :],
                 acc.to(Y.dtype.element_ty), mask=tile_ok)

    @triton.jit
    def _ssd_short_bwd_rows_kernel(X, DT, A, Bm, Cm, DY, DTBias, DCpart, DaRow, Mass, L, H, P, N, heads_per_group,
                                   hblocks,
                                   stride_xb, stride_xl, stride_xh, stride_db, stride_dl, stride_dh,
                                   stride_bb, stride_bl, stride_bg, stride_cb, stride_cl, stride_cg,
                                   stride_yb, stride_yl, stride_yh,
                                   BLOCK: tl.constexpr, HEADS: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
                                   FACTOR_DIAG: tl.constexpr, DIAG_SPAN: tl.constexpr, PRECISION: tl.constexpr):
        """One program: rows m of block I for HEADS heads of one group of one sequence. Writes these heads' share
        of dC of its rows into DCpart (b, l, groups·hblocks, N) fp32 (summed over the head blocks afterwards); into
        DaRow (b, l, h) fp32 the parts of da[t] from pairs with m in I (n before I: a suffix sum of row totals; n in
        I: pairwise); into Mass (b, blocks, blocks, h) fp32 the total of Q over each block pair (I, J < I)."""
        pid_m, pid_h, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        blocks = tl.num_programs(0)
        group, first, end, k, head, h_ok, a, bias, col_k, col_p, col_ok, col_off = _head_block(
            pid_h, hblocks, heads_per_group, A, DTBias, P, stride_xh, HEADS, BP)
        d = tl.arange(0, BD)
        d_ok = d < N
        start = pid_m * BLOCK
        m = start + tl.arange(0, BLOCK)
        m_ok = m < L
        tile_ok = m_ok[:, None] & col_ok[None, :]
        dt_ptr = DT + pid_b * stride_db
        x_ptr = X + pid_b * stride_xb
        dy_ptr = DY + pid_b * stride_yb + m[:, None] * stride_yl + ((first + col_k) * stride_yh + col_p)[None, :]
        b_ptr = Bm + pid_b * stride_bb + group * stride_bg
        c_m = tl.load(Cm + pid_b * stride_cb + group * stride_cg + m[:, None] * stride_cl + d[None, :],
                      mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        dt_m, _s = _dt_load(dt_ptr, m[:, None], head[None, :], m_ok[:, None] & h_ok[None, :], stride_dl, stride_dh,
                            bias[None, :])
        cs_m = tl.cumsum(dt_m * a[None, :], axis=0)  # cum[m] − r, [BLOCK, HEADS]
        u = tl.exp(cs_m)
        dy_m = tl.load(dy_ptr, mask=tile_ok, other=0.0)
        dyu_lo = _scaled(dy_m, u, BP)
        acc = tl.zeros((BLOCK, HEADS * BP), dtype=tl.float32)
        dc = tl.zeros((BLOCK, BD), dtype=tl.float32)
        tail = tl.zeros((HEADS,), dtype=tl.float32)
        for back in range(0, pid_m):  # earlier blocks J, nearest first
            jb = pid_m - 1 - back
            n = jb * BLOCK + tl.arange(0, BLOCK)
            dt_n, _s = _dt_load(dt_ptr, n[:, None], head[None, :], h_ok[None, :] & (n < L)[:, None], stride_dl,
                                stride_dh, bias[None, :])
            a_n = dt_n * a[None, :]
            w = tl.exp(tl.cumsum(a_n, axis=0, reverse=True) - a_n + tail[None, :]) * dt_n
            tail += tl.sum(a_n, axis=0)
            x_n = tl.load(x_ptr + n[:, None] * stride_xl + col_off[None, :], mask=col_ok[None, :], other=0.0)
            xw = _scaled(x_n, w, BP)
            b_n = tl.load(b_ptr + n[:, None] * stride_bl + d[None, :], mask=d_ok[None, :], other=0.0)
            g = tl.dot(c_m, tl.trans(b_n), input_precision=PRECISION)
            part = tl.dot(g.to(x_n.dtype), xw, input_precision=PRECISION)  # this block pair's share of y / u
            acc += part
            # Q summed over the block pair, per head: Σ dy·u·part
            mass = tl.sum(_per_head(dy_m.to(tl.float32) * _widen(u, BP) * part, HEADS, BP), axis=0)
            tl.store(Mass + ((pid_b * blocks + pid_m) * blocks + jb) * H + head, mass, mask=h_ok)
            dg = tl.dot(dyu_lo, tl.trans(xw), input_precision=PRECISION)  # Σ_heads u dy · w dt x
            dc = tl.dot(dg.to(b_n.dtype), b_n, acc=dc, input_precision=PRECISION)
        # pairs with n before I: Σ_{m ≥ t, m in I} (Σ_n Q[m, n])
        row_q = _per_head(dy_m.to(tl.float32) * _widen(u, BP) * acc, HEADS, BP)
        da = tl.cumsum(row_q, axis=0, reverse=True)
        x_m = tl.load(x_ptr + m[:, None] * stride_xl + col_off[None, :], mask=tile_ok, other=0.0)
        b_m = tl.load(b_ptr + m[:, None] * stride_bl + d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        g_mm = tl.dot(c_m, tl.trans(b_m), input_precision=PRECISION)
        causal = m[:, None] >= m[None, :]
        if FACTOR_DIAG:
            if _diagonal_factorable(cs_m, DIAG_SPAN):
                # dy·u against x·exp(r − cum[n])·dt: each head's dS·exp(..)·dt without its exponentials
                xw_m = _scaled(x_m, tl.exp(-cs_m) * dt_m, BP)
                da, dg_mm = _rows_diagonal(da, g_mm, causal, dy_m, x_m, dyu_lo, xw_m, dt_ptr, A, DTBias, m, m_ok,
                                           first, end, col_k, k, stride_dl, stride_dh, BLOCK, HEADS, True, PRECISION)
            else:
                da, dg_mm = _rows_diagonal(da, g_mm, causal, dy_m, x_m, dyu_lo, x_m, dt_ptr, A, DTBias, m, m_ok,
                                           first, end, col_k, k, stride_dl, stride_dh, BLOCK, HEADS, False,
                                           PRECISION)
        else:
            da, dg_mm = _rows_diagonal(da, g_mm, causal, dy_m, x_m, dyu_lo, x_m, dt_ptr, A, DTBias, m, m_ok, first,
                                       end, col_k, k, stride_dl, stride_dh, BLOCK, HEADS, False, PRECISION)
        tl.store(DaRow + (pid_b * L + m[:, None]) * H + head[None, :], da, mask=m_ok[:, None] & h_ok[None, :])
        dc = tl.dot(dg_mm.to(b_m.dtype), b_m, acc=dc, input_precision=PRECISION)
        tl.store(DCpart + ((pid_b * L + m[:, None]) * tl.num_programs(1) + pid_h) * N + d[None, :], dc,
                 mask=m_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _ssd_short_bwd_cols_kernel(X, DT, A, Bm, Cm, Dskip, DY, DTBias, DX, DBpart, DaCol, Direct, DDpart, L, H, P, N,
                                   heads_per_group, hblocks,
                                   stride_xb, stride_xl, stride_xh, stride_db, stride_dl, stride_dh,
                                   stride_bb, stride_bl, stride_bg, stride_cb, stride_cl, stride_cg,
                                   stride_yb, stride_yl, stride_yh, stride_gxb, stride_gxl, stride_gxh,
                                   BLOCK: tl.constexpr, HEADS: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
                                   FACTOR_DIAG: tl.constexpr, DIAG_SPAN: tl.constexpr, HAS_D: tl.constexpr,
                                   PRECISION: tl.constexpr):
        """One program: columns n of block J for HEADS heads of one group of one sequence.
        Z[n] = Σ_{m ≥ n} G[m,n]·exp(cum[m]−cum[n])·dy[m] (per head) gives dx = dt·Z + D dy and Direct = Σ_p x·Z
        (fp32, (b, l, h)); writes these heads' share of dB into DBpart (b, l, groups·hblocks, N) fp32, into DaCol
        the part of da[t] from pairs with n in J before t and m after J (a prefix sum of column totals), and dD's
        share into DDpart (b, blocks, h)."""
        pid_n, pid_h, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        blocks = tl.num_programs(0)
        group, first, end, k, head, h_ok, a, bias, col_k, col_p, col_ok, col_off = _head_block(
            pid_h, hblocks, heads_per_group, A, DTBias, P, stride_xh, HEADS, BP)
        y_off = ((first + col_k) * stride_yh + col_p)[None, :]
        d = tl.arange(0, BD)
        d_ok = d < N
        start = pid_n * BLOCK
        n = start + tl.arange(0, BLOCK)
        n_ok = n < L
        tile_ok = n_ok[:, None] & col_ok[None, :]
        dt_ptr = DT + pid_b * stride_db
        x_ptr = X + pid_b * stride_xb
        dy_ptr = DY + pid_b * stride_yb
        c_ptr = Cm + pid_b * stride_cb + group * stride_cg
        b_n = tl.load(Bm + pid_b * stride_bb + group * stride_bg + n[:, None] * stride_bl + d[None, :],
                      mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        dt_n, _s = _dt_load(dt_ptr, n[:, None], head[None, :], n_ok[:, None] & h_ok[None, :], stride_dl, stride_dh,
                            bias[None, :])
        a_n = dt_n * a[None, :]
        w = tl.exp(tl.cumsum(a_n, axis=0, reverse=True) - a_n)  # exp(cum[end of J] − cum[n]), [BLOCK, HEADS]
        x_n = tl.load(x_ptr + n[:, None] * stride_xl + col_off[None, :], mask=tile_ok, other=0.0)
        xw = _scaled(x_n, w * dt_n, BP)
        z = tl.zeros((BLOCK, HEADS * BP), dtype=tl.float32)
        db = tl.zeros((BLOCK, BD), dtype=tl.float32)
        lead = tl.zeros((HEADS,), dtype=tl.float32)  # Σ dt·A over the blocks between J and I
        for s in range(start + BLOCK, L, BLOCK):  # later blocks I
            m = s + tl.arange(0, BLOCK)
            m_ok = m < L
            dt_m, _s = _dt_load(dt_ptr, m[:, None], head[None, :], m_ok[:, None] & h_ok[None, :], stride_dl,
                                stride_dh, bias[None, :])
            a_m = dt_m * a[None, :]
            u = tl.exp(tl.cumsum(a_m, axis=0) + lead[None, :])  # exp(cum[m] − cum[end of J])
            lead += tl.sum(a_m, axis=0)
            dy_m = tl.load(dy_ptr + m[:, None] * stride_yl + y_off, mask=m_ok[:, None] & col_ok[None, :], other=0.0)
            dyu = _scaled(dy_m, u, BP)
            c_m = tl.load(c_ptr + m[:, None] * stride_cl + d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            g = tl.dot(c_m, tl.trans(b_n), input_precision=PRECISION)  # [m, n]
            z = tl.dot(tl.trans(g).to(dy_m.dtype), dyu, acc=z, input_precision=PRECISION)
            dg = tl.dot(dyu, tl.trans(xw), input_precision=PRECISION)  # [m, n]
            db = tl.dot(tl.trans(dg).to(c_m.dtype), c_m, acc=db, input_precision=PRECISION)
        z = z * _widen(w, BP)
        # pairs with m after J: Σ_{n < t, n in J} (Σ_m Q[m, n])
        col_q = _per_head(x_n.to(tl.float32) * z, HEADS, BP) * dt_n
        da = tl.cumsum(col_q, axis=0) - col_q
        dy_n = tl.load(dy_ptr + n[:, None] * stride_yl + y_off, mask=tile_ok, other=0.0)
        c_n = tl.load(c_ptr + n[:, None] * stride_cl + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        g_nn = tl.dot(c_n, tl.trans(b_n), input_precision=PRECISION)  # [m, n], both in J
        causal = n[:, None] >= n[None, :]
        if FACTOR_DIAG:
            cs_n = tl.cumsum(a_n, axis=0)  # cum − r within J
            if _diagonal_factorable(cs_n, DIAG_SPAN):
                # all heads at once: Σ_m G·exp(cum[m] − cum[n])·dy[m] = exp(r − cum[n]) · (Gᵀ · (exp(cum[m] − r)·dy))
                dyu_n = _scaled(dy_n, tl.exp(cs_n), BP)
                xw_n = _scaled(x_n, tl.exp(-cs_n) * dt_n, BP)
                zd = tl.dot(tl.trans(tl.where(causal, g_nn, 0.0)).to(dy_n.dtype), dyu_n, input_precision=PRECISION)
                z += zd * _widen(tl.exp(-cs_n), BP)
                dg_nn = tl.where(causal, tl.dot(dyu_n, tl.trans(xw_n), input_precision=PRECISION), 0.0)
            else:
                z, dg_nn = _cols_diagonal_pairwise(z, g_nn, causal, x_n, dy_n, dt_ptr, A, DTBias, n, n_ok, first,
                                                   end, col_k, stride_dl, stride_dh, BLOCK, HEADS, PRECISION)
        else:
            z, dg_nn = _cols_diagonal_pairwise(z, g_nn, causal, x_n, dy_n, dt_ptr, A, DTBias, n, n_ok, first, end,
                                               col_k, stride_dl, stride_dh, BLOCK, HEADS, PRECISION)
        direct = _per_head(x_n.to(tl.float32) * z, HEADS, BP)
        dx = z * _widen(dt_n, BP)
        if HAS_D:
            d_col = tl.load(Dskip + first + col_k, mask=col_ok, other=0.0).to(tl.float32)
            dx += d_col[None, :] * dy_n.to(tl.float32)
        tl.store(DX + pid_b * stride_gxb + n[:, None] * stride_gxl + ((first + col_k) * stride_gxh + col_p)[None, :],
                 dx.to(DX.dtype.element_ty), mask=tile_ok)
        buf = (pid_b * L + n[:, None]) * H + head[None, :]
        out_ok = n_ok[:, None] & h_ok[None, :]
        tl.store(Direct + buf, direct, mask=out_ok)
        tl.store(DaCol + buf, da, mask=out_ok)
        dd = tl.sum(_per_head(x_n.to(tl.float32) * dy_n.to(tl.float32), HEADS, BP), axis=0)
        tl.store(DDpart + (pid_b * blocks + pid_n) * H + head, dd, mask=h_ok)
        db = tl.dot(tl.trans(dg_nn).to(c_n.dtype), c_n, acc=db, input_precision=PRECISION)
        tl.store(DBpart + ((pid_b * L + n[:, None]) * tl.num_programs(1) + pid_h) * N + d[None, :], db,
                 mask=n_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _ssd_short_bwd_dt_kernel(DT, A, DTBias, DaRow, DaCol, Cross, Direct, DDT, Part, L, H, stride_db, stride_dl,
                                 stride_dh,
                                 stride_gb, stride_gl, stride_gh,
                                 BLOCK: tl.constexpr, BLOCK_L: tl.constexpr, HEADS: tl.constexpr):
        """One program: HEADS heads of one sequence, every position. da = DaRow + DaCol + Cross (per block),
        ddt = (da·A + Direct)·softplus' (the raw dt's gradient); Σ_t da·dt (dA's share) and Σ_t ddt (dt_bias's)
        into Part (b, 2, h)."""
        pid_h, pid_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        head = pid_h * HEADS + tl.arange(0, HEADS)
        h_ok = head < H
        t = tl.arange(0, BLOCK_L)
        ok = h_ok[:, None] & (t < L)[None, :]
        a = tl.load(A + head, mask=h_ok, other=0.0).to(tl.float32)
        bias = tl.load(DTBias + head, mask=h_ok, other=0.0).to(tl.float32)
        dt, slope = _dt_load(DT + pid_b * stride_db, t[None, :], head[:, None], ok, stride_dl, stride_dh,
                             bias[:, None])
        buf = (pid_b * L + t[None, :]) * H + head[:, None]
        blocks = tl.cdiv(L, BLOCK)
        da = (tl.load(DaRow + buf, mask=ok, other=0.0) + tl.load(DaCol + buf, mask=ok, other=0.0)
              + tl.load(Cross + (pid_b * blocks + t[None, :] // BLOCK) * H + head[:, None], mask=ok, other=0.0))
        ddt = (da * a[:, None] + tl.load(Direct + buf, mask=ok, other=0.0)) * slope
        tl.store(DDT + pid_b * stride_gb + t[None, :] * stride_gl + head[:, None] * stride_gh,
                 ddt.to(DDT.dtype.element_ty), mask=ok)
        tl.store(Part + pid_b * 2 * H + head, tl.sum(da * dt, axis=1), mask=h_ok)
        tl.store(Part + (pid_b * 2 + 1) * H + head, tl.sum(ddt, axis=1), mask=h_ok)


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


def _layout(config: dict | None, l: int, h: int, g: int, p: int, forward: bool) -> tuple[dict, dict]:
    config = dict(config or default_config(l, h // g, p, factor_diag=forward))
    launch = {k: config.pop(k) for k in ("num_warps", "num_stages") if k in config}
    heads, block, factor = config["HEADS"], config["BLOCK"], bool(config.get("FACTOR_DIAG", False))
    if heads & (heads - 1) or block & (block - 1) or block < 16:
        raise ValueError(f"HEADS ({heads}) must be a power of two and BLOCK ({block}) a power of two >= 16")
    block_p = max(_pow2(p), 16 // heads)  # at least 16 columns in the dots
    return {"BLOCK": block, "HEADS": heads, "BP": block_p, "FACTOR_DIAG": factor, "DIAG_SPAN": DIAG_SPAN}, launch


def _dense(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _precision(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def ssd_short_forward(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, dt_bias: Tensor,
                      config: dict | None = None) -> Tensor:
    """y = SSD(x, softplus(dt + dt_bias), A, B, C) + D x for l ≤ MAX_LEN, in x's dtype."""
    b, l, h, p, g, n = _check(x, dt, A, B, C, dt_bias)
    x, B, C = (_dense(t) for t in (x, B, C))
    consts, launch = _layout(config, l, h, g, p, forward=True)
    if consts["BLOCK"] >= 64 and consts["BLOCK"] > consts["HEADS"] * consts["BP"]:
        # measured wrong on the H200 with Triton 3.6 (64-token blocks of 32 columns: 0.23 relative error at 4 warps,
        # NaN at 8) while Triton's interpreter computes it right; no such launch is trusted (docs/notes.md 18.12)
        raise ValueError(f"the forward takes no 64-token blocks with fewer columns ({consts['BLOCK']} tokens, "
                         f"HEADS x headdim = {consts['HEADS'] * consts['BP']})")
    y = torch.empty((b, l, h, p), dtype=x.dtype, device=x.device)
    hblocks = triton.cdiv(h // g, consts["HEADS"])
    _ssd_short_fwd_kernel[(triton.cdiv(l, consts["BLOCK"]), g * hblocks, b)](
        x, dt, A.contiguous(), B, C, D if D is not None else A, dt_bias.contiguous(), y, l, p, n, h // g, hblocks,
        *x.stride()[:3], *dt.stride(), *B.stride()[:3], *C.stride()[:3], *y.stride()[:3],
        BD=_pow2(n, 16), HAS_D=D is not None, PRECISION=_precision(x), **consts, **launch)
    return y


def ssd_short_backward(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, dt_bias: Tensor,
                       dy: Tensor, config: dict | None = None) -> tuple[Tensor, ...]:
    """Gradients (dx, ddt, dA, dB, dC, dD, ddt_bias), each in its input's dtype (dD None without D); dt raw."""
    b, l, h, p, g, n = _check(x, dt, A, B, C, dt_bias)
    x, B, C, dy = (_dense(t) for t in (x, B, C, dy))
    consts, launch = _layout(config, l, h, g, p, forward=False)
    blocks = triton.cdiv(l, consts["BLOCK"])
    dev, f32 = x.device, torch.float32
    dx = torch.empty((b, l, h, p), dtype=x.dtype, device=dev)
    hblocks = triton.cdiv(h // g, consts["HEADS"])
    db_part = torch.empty((b, l, g * hblocks, n), dtype=f32, device=dev)  # summed over each group's head blocks
    dc_part = torch.empty((b, l, g * hblocks, n), dtype=f32, device=dev)
    da_row = torch.empty((b, l, h), dtype=f32, device=dev)
    da_col = torch.empty((b, l, h), dtype=f32, device=dev)
    direct = torch.empty((b, l, h), dtype=f32, device=dev)
    mass = torch.zeros((b, blocks, blocks, h), dtype=f32, device=dev)  # only J < I is written
    dd_part = torch.empty((b, blocks, h), dtype=f32, device=dev)
    A32, bias = A.contiguous(), dt_bias.contiguous()
    strides = (*x.stride()[:3], *dt.stride(), *B.stride()[:3], *C.stride()[:3], *dy.stride()[:3])
    common = dict(BD=_pow2(n, 16), PRECISION=_precision(x), **consts, **launch)
    grid = (blocks, g * hblocks, b)
    _ssd_short_bwd_rows_kernel[grid](x, dt, A32, B, C, dy, bias, dc_part, da_row, mass, l, h, p, n, h // g, hblocks,
                                     *strides, **common)
    _ssd_short_bwd_cols_kernel[grid](x, dt, A32, B, C, D if D is not None else A32, dy, bias, dx, db_part, da_col,
                                     direct, dd_part, l, h, p, n, h // g, hblocks, *strides, *dx.stride()[:3],
                                     HAS_D=D is not None, **common)
    dB = db_part.unflatten(2, (g, hblocks)).sum(3).to(B.dtype)
    dC = dc_part.unflatten(2, (g, hblocks)).sum(3).to(C.dtype)
    # pairs with m after block I and n before it: Σ over the block pairs (I2 > I > J) of their totals
    # (sums, not a matmul: no TF32 however the caller set torch's matmul precision)
    idx = torch.arange(blocks, device=dev)
    before = torch.zeros_like(mass)  # [b, I2, k]: Σ_{J < k} of block row I2
    before[:, :, 1:] = mass[:, :, :-1].cumsum(2)
    cross = (before * (idx[:, None] > idx[None, :]).to(f32)[None, :, :, None]).sum(1).contiguous()
    ddt = torch.empty((b, l, h), dtype=dt.dtype, device=dev)
    part = torch.empty((b, 2, h), dtype=f32, device=dev)
    per_program = min(_pow2(h), 8)
    _ssd_short_bwd_dt_kernel[(triton.cdiv(h, per_program), b)](
        dt, A32, bias, da_row, da_col, cross, direct, ddt, part, l, h, *dt.stride(), *ddt.stride(),
        BLOCK=consts["BLOCK"], BLOCK_L=_pow2(l, 16), HEADS=per_program, num_warps=4)
    dD = dd_part.sum((0, 1)).to(D.dtype) if D is not None else None
    sums = part.sum(0)
    return dx, ddt, sums[0].to(A.dtype), dB, dC, dD, sums[1].to(dt_bias.dtype)


class SSDShortScan(torch.autograd.Function):
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
    return SSDShortScan.apply(x, dt, A, B, C, D, dt_bias, fwd_config, bwd_config)
