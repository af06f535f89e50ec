"""A forward-only SSD scan in one Triton kernel, for inference.

mamba-ssm's chunked scan runs as five kernels (dt cumsum, per-chunk states, state passing, C·Bᵀ per chunk, chunk
scan) and writes every chunk's state (heads × headdim × d_state, fp32) to memory and reads it back: at 1024 px on
the 135M config that traffic and the five launches were a large share of the encoder's time (docs/notes.md,
section 6).
Inference needs no saved intermediates, so here one program owns one (batch, head, headdim block) and walks its
sequence chunk by chunk, keeping the running state on chip:

    per chunk (t, s positions inside it; cs = cumulative sum of dt·A):
        y_t     = Σ_{s≤t} (C_t·B_s) exp(cs_t − cs_s) dt_s x_s   +   exp(cs_t) C_t · state   +   D x_t
        state  ← exp(cs_end) state + Σ_s exp(cs_end − cs_s) dt_s B_s x_sᵀ

the same chunked form as `vision_model.ops.ssd_minimal.ssd_chunked` (and the recurrence in `ssd_recurrent`), which the tests
hold it to. Short chunks are cheap here (no per-chunk state round trip), so the kernel picks its own chunk length;
the config's chunk_size only matters to the training kernels.

Head dims under 64 (the paper's 32 and 16) have a second kernel in which one program owns several whole heads of
one group (a 64-wide block of x columns): C·Bᵀ of a chunk, the largest term when heads are narrow, is computed once
for all of them, and every dot keeps the 64-wide shapes of the verified one-head launch. Its CUDA launches are held
to `VERIFIED_MULTIHEAD`, which a GPU run fills.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import tl, triton  # None where Triton cannot run (no GPU, no interpreter)


if triton is not None:
    @triton.jit
    def _ssd_forward_kernel(X, DT, DTScale, A, Bm, Cm, Dskip, DTBias, Y, States, Totals,
                            L, P, N, heads_per_group, seg_len, n_saved,
                            stride_xb, stride_xl, stride_xh, stride_dtb, stride_dtl, stride_dth,
                            stride_bb, stride_bl, stride_bg, stride_cb, stride_cl, stride_cg,
                            stride_yb, stride_yl, stride_yh,
                            CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                            HAS_D: tl.constexpr, HAS_DT_SCALE: tl.constexpr, MODE: tl.constexpr,
                            PRECISION: tl.constexpr):
        """One program: one (batch, head, headdim block) over the whole sequence (MODE 0) or one segment of it.
        MODE 1: only the segment's own final state (from zero) and its summed log-decay, into States / Totals.
        MODE 2: the segment's outputs, starting from the state the earlier segments hand over."""
        pid, pid_b, seg = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
        n_pblocks = tl.cdiv(P, BLOCK_P)
        n_heads = tl.num_programs(0) // n_pblocks
        head, pblock = pid // n_pblocks, pid % n_pblocks
        group = head // heads_per_group
        p = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        r = tl.arange(0, CHUNK)
        p_ok, n_ok = p < P, n < N
        causal = r[:, None] >= r[None, :]

        a_head = tl.load(A + head).to(tl.float32)
        dt_bias = tl.load(DTBias + head).to(tl.float32)
        x_ptr = X + pid_b * stride_xb + head * stride_xh
        dt_ptr = DT + pid_b * stride_dtb + head * stride_dth
        b_ptr = Bm + pid_b * stride_bb + group * stride_bg
        c_ptr = Cm + pid_b * stride_cb + group * stride_cg
        y_ptr = Y + pid_b * stride_yb + head * stride_yh
        # saved segment states: (batch, head, segment, N, P) fp32; their log-decays: (batch, head, segment)
        saved = (pid_b * n_heads + head) * n_saved
        state_tile = n[:, None] * P + p[None, :]
        state_ok = n_ok[:, None] & p_ok[None, :]

        state = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
        if MODE == 2:
            for j in range(0, seg):  # the state entering this segment: earlier segments' states, decayed in turn
                decay_j = tl.exp(tl.load(Totals + saved + j))
                state = state * decay_j + tl.load(States + (saved + j) * N * P + state_tile, mask=state_ok, other=0.0)
        total = 0.0
        # MODE 0 keeps the whole-sequence loop's constant start: with a runtime start that loop ran slower
        # (docs/notes.md section 11)
        if MODE == 0:
            seg_start = 0
            seg_end = L
        else:
            seg_start = seg * seg_len
            seg_end = tl.minimum(L, (seg + 1) * seg_len)
        for start in range(seg_start, seg_end, CHUNK):
            t = start + r
            t_ok = t < seg_end
            dt = tl.load(dt_ptr + t * stride_dtl, mask=t_ok, other=0.0).to(tl.float32)
            if HAS_DT_SCALE:  # the row's pre-norm rstd (in_proj read the un-normalised stream)
                dt *= tl.load(DTScale + pid_b * L + t, mask=t_ok, other=0.0)
            dt += dt_bias
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)  # softplus, linear where exp would overflow
            dt = tl.where(t_ok, dt, 0.0)  # past the end: no input and no decay
            cs = tl.cumsum(dt * a_head, axis=0)
            cs_end = tl.sum(dt * a_head, axis=0)

            x = tl.load(x_ptr + t[:, None] * stride_xl + p[None, :], mask=t_ok[:, None] & p_ok[None, :], other=0.0)
            bmat = tl.load(b_ptr + t[:, None] * stride_bl + n[None, :], mask=t_ok[:, None] & n_ok[None, :], other=0.0)
            if MODE != 1:
                cmat = tl.load(c_ptr + t[:, None] * stride_cl + n[None, :], mask=t_ok[:, None] & n_ok[None, :],
                               other=0.0)
                # inside the chunk: (C Bᵀ ∘ decay ∘ dt) x
                scores = tl.dot(cmat, tl.trans(bmat), input_precision=PRECISION)
                decay = tl.exp(tl.where(causal, cs[:, None] - cs[None, :], float("-inf")))
                scores = scores * decay * dt[None, :]
                y = tl.dot(scores.to(x.dtype), x, input_precision=PRECISION)
                # carried in from earlier chunks
                y += tl.dot(cmat, state.to(cmat.dtype), input_precision=PRECISION) * tl.exp(cs)[:, None]
                if HAS_D:
                    y += tl.load(Dskip + head).to(tl.float32) * x.to(tl.float32)
                tl.store(y_ptr + t[:, None] * stride_yl + p[None, :], y.to(Y.dtype.element_ty),
                         mask=t_ok[:, None] & p_ok[None, :])

            to_end = tl.exp(cs_end - cs) * dt
            weighted_b = (bmat.to(tl.float32) * to_end[:, None]).to(x.dtype)
            state = state * tl.exp(cs_end) + tl.dot(tl.trans(weighted_b), x, input_precision=PRECISION)
            total += cs_end
        if MODE == 1:
            tl.store(States + (saved + seg) * N * P + state_tile, state, mask=state_ok)
            tl.store(Totals + saved + seg, total, mask=pblock == 0)


    @triton.jit
    def _ssd_forward_heads_kernel(X, DT, DTScale, A, Bm, Cm, Dskip, DTBias, Y, States, Totals,
                                  L, H, N, heads_per_group, seg_len, n_saved,
                                  stride_xb, stride_xl, stride_xh, stride_dtb, stride_dtl, stride_dth,
                                  stride_bb, stride_bl, stride_bg, stride_cb, stride_cl, stride_cg,
                                  stride_yb, stride_yl, stride_yh,
                                  CHUNK: tl.constexpr, HEADDIM: tl.constexpr, HEADS: tl.constexpr,
                                  BLOCK_N: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_SCALE: tl.constexpr,
                                  MODE: tl.constexpr, PRECISION: tl.constexpr):
        """One program: HEADS heads of one (batch, group), i.e. a block of HEADS * HEADDIM x columns, over the whole
        sequence (MODE 0) or one segment (MODE 1 / 2 as in `_ssd_forward_kernel`). C·Bᵀ of a chunk is computed once
        and serves every head; each head has its own decays, and the states of all heads sit side by side in one
        (d_state, HEADS * HEADDIM) tile, so the state read-out and update are one dot each for all heads. Every
        dot is at least HEADS * HEADDIM wide: the per-head intra-chunk product multiplies the whole x block with the
        other heads' columns zeroed (narrow dots were the launches that went wrong on the GPU)."""
        BLOCK: tl.constexpr = HEADS * HEADDIM
        hblock, pid_b, seg = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
        first = hblock * HEADS
        group = first // heads_per_group
        col = tl.arange(0, BLOCK)
        col_head = col // HEADDIM  # which of the program's heads each column belongs to
        head_col = first + col_head
        pp = col % HEADDIM
        col_ok = head_col < H
        n = tl.arange(0, BLOCK_N)
        r = tl.arange(0, CHUNK)
        n_ok = n < N
        causal = r[:, None] >= r[None, :]

        x_ptr = X + pid_b * stride_xb + head_col * stride_xh + pp  # (BLOCK,) column addresses
        y_ptr = Y + pid_b * stride_yb + head_col * stride_yh + pp
        dt_ptr = DT + pid_b * stride_dtb
        b_ptr = Bm + pid_b * stride_bb + group * stride_bg
        c_ptr = Cm + pid_b * stride_cb + group * stride_cg
        # saved segment states: (batch, head, segment, N, HEADDIM) fp32; their log-decays: (batch, head, segment)
        saved_col = (pid_b * H + head_col) * n_saved
        state_tile = n[:, None] * HEADDIM + pp[None, :]
        state_ok = n_ok[:, None] & col_ok[None, :]
        if HAS_D:
            d_col = tl.load(Dskip + head_col, mask=col_ok, other=0.0).to(tl.float32)

        state = tl.zeros((BLOCK_N, BLOCK), dtype=tl.float32)
        if MODE == 2:
            for j in range(0, seg):
                decay_j = tl.exp(tl.load(Totals + saved_col + j, mask=col_ok, other=0.0))
                state = state * decay_j[None, :] + tl.load(States + (saved_col[None, :] + j) * N * HEADDIM
                                                           + state_tile, mask=state_ok, other=0.0)
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        if MODE == 0:
            seg_start = 0
            seg_end = L
        else:
            seg_start = seg * seg_len
            seg_end = tl.minimum(L, (seg + 1) * seg_len)
        for start in range(seg_start, seg_end, CHUNK):
            t = start + r
            t_ok = t < seg_end
            tile_ok = t_ok[:, None] & col_ok[None, :]
            x = tl.load(x_ptr[None, :] + t[:, None] * stride_xl, mask=tile_ok, other=0.0)
            bmat = tl.load(b_ptr + t[:, None] * stride_bl + n[None, :], mask=t_ok[:, None] & n_ok[None, :], other=0.0)
            if MODE != 1:
                cmat = tl.load(c_ptr + t[:, None] * stride_cl + n[None, :], mask=t_ok[:, None] & n_ok[None, :],
                               other=0.0)
                cb = tl.dot(cmat, tl.trans(bmat), input_precision=PRECISION)  # shared by the program's heads
                # carried in from earlier chunks, all heads in one dot; each head's columns decayed in the loop
                y = tl.dot(cmat, state.to(cmat.dtype), input_precision=PRECISION)
            if HAS_DT_SCALE:
                row_scale = tl.load(DTScale + pid_b * L + t, mask=t_ok, other=0.0)
            x_to_end = tl.zeros((CHUNK, BLOCK), dtype=x.dtype)  # each column: x dt decayed to the chunk's end
            end_cols = tl.zeros((BLOCK,), dtype=tl.float32)  # each column: its head's summed log-decay
            for k in tl.static_range(HEADS):
                head = first + k
                head_ok = head < H
                dt = tl.load(dt_ptr + t * stride_dtl + head * stride_dth, mask=t_ok & head_ok, other=0.0)
                dt = dt.to(tl.float32)
                if HAS_DT_SCALE:
                    dt *= row_scale
                dt += tl.load(DTBias + head, mask=head_ok, other=0.0).to(tl.float32)
                dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
                dt = tl.where(t_ok & head_ok, dt, 0.0)
                a_head = tl.load(A + head, mask=head_ok, other=0.0).to(tl.float32)
                cs = tl.cumsum(dt * a_head, axis=0)
                cs_end = tl.sum(dt * a_head, axis=0)
                mine = (col_head == k)[None, :]
                x_to_end = tl.where(mine, (x.to(tl.float32) * (tl.exp(cs_end - cs) * dt)[:, None]).to(x.dtype),
                                    x_to_end)
                end_cols = tl.where(col_head == k, cs_end, end_cols)
                if MODE != 1:
                    y = tl.where(mine, y * tl.exp(cs)[:, None], y)
                    # inside the chunk: (C Bᵀ ∘ decay ∘ dt) x for this head's columns (the others' x zeroed)
                    decay = tl.exp(tl.where(causal, cs[:, None] - cs[None, :], float("-inf")))
                    scores = (cb * decay * dt[None, :]).to(x.dtype)
                    y = tl.dot(scores, tl.where(mine, x, 0.0).to(x.dtype), acc=y, input_precision=PRECISION)
            if MODE != 1:
                if HAS_D:
                    y += d_col[None, :] * x.to(tl.float32)
                tl.store(y_ptr[None, :] + t[:, None] * stride_yl, y.to(Y.dtype.element_ty), mask=tile_ok)
            state = state * tl.exp(end_cols)[None, :] + tl.dot(tl.trans(bmat), x_to_end, input_precision=PRECISION)
            total += end_cols
        if MODE == 1:
            tl.store(States + (saved_col[None, :] + seg) * N * HEADDIM + state_tile, state, mask=state_ok)
            tl.store(Totals + saved_col + seg, total, mask=col_ok & (pp == 0))


# On the H100 with Triton 3.6 several launches of the one-head kernel fault ("illegal memory access") or give wrong
# bf16 results that change from run to run, while the same launch in fp32 is exact: a compiler race of the kind reported
# upstream for chunked recurrences with tl.dot (docs/notes.md section 11). Measured bad: 128-long chunks, 8 warps,
# 16-wide headdim blocks with d_state 128 (any stage count), and the whole-sequence loop with 2 pipeline stages
# (bf16 errors far above mamba-ssm's). What ran right in every check (benchmarks/gpu/
# ssd_forward_accuracy.py): 64-long chunks, 4 warps, one stage, and the whole headdim in one block of 64 (headdim a
# multiple of 64) or of 16 (headdim 16 with d_state <= 32). CUDA launches are held to that; the CPU interpreter,
# which tests the arithmetic, takes any config.
MAX_CHUNK, NUM_WARPS, NUM_STAGES = 64, 4, 1


def headdim_block(headdim: int, d_state: int) -> int | None:
    """The headdim block a CUDA launch of the one-head kernel may use for this head shape, or None when none is
    verified."""
    if headdim % 64 == 0:
        return 64
    if headdim == 16 and d_state <= 32:
        return 16
    return None


# Launches of the several-heads-a-program kernel (`_ssd_forward_heads_kernel`) that a GPU run verified, as
# (headdim, d_state, heads per program, chunk length), each with 4 warps and one stage. A CUDA launch outside this
# set is refused (`unverified=True` lets GPU experiments through). benchmarks/gpu/official_speed.py checks the
# candidates against mamba-ssm and the PyTorch scan in fp32 and bf16 and prints the entries to add here; its speed
# table switches the kernel on only for the entries its own run passed. Every entry passed all eight cases (224,
# 1024 and 2048 px calls at D and D/8 head counts, odd lengths and head counts, dt scaled per row) on the H200: the
# 64-token chunks in results/bench/h200-2026-12-02-official-speed-v2/call-b-verified-new/verify.jsonl, the 32-token
# ones (taken where both are verified: 1.2-1.6x faster there) in results/bench/h200-2026-12-02-official-speed-v3/.
VERIFIED_MULTIHEAD: set[tuple[int, int, int, int]] = {(32, 128, 2, 64), (16, 128, 4, 64),
                                                      (32, 128, 2, 32), (16, 128, 4, 32)}


def heads_per_program(headdim: int) -> int | None:
    """How many heads the several-heads kernel gives one program: a 64-wide x block, as in the verified one-head
    launches (None for head dims it does not serve)."""
    if headdim >= 64 or 64 % headdim:
        return None
    return 64 // headdim


def multihead_chunk(headdim: int, d_state: int) -> int | None:
    """The chunk length of the several-heads launch for a head shape: the shortest verified one (shorter chunks do
    less work inside each chunk, which dominates at narrow heads), or None where no launch is verified."""
    heads = heads_per_program(headdim)
    chunks = [c for (p, n, h, c) in VERIFIED_MULTIHEAD if (p, n, h) == (headdim, d_state, heads)]
    return min(chunks) if chunks else None


def multihead_verified(headdim: int, d_state: int) -> bool:
    return multihead_chunk(headdim, d_state) is not None


def fused_forward_supported(headdim: int, d_state: int) -> bool:
    """Whether inference on CUDA takes one of the one-kernel forwards for a head shape (else mamba-ssm's chunked
    scan)."""
    return multihead_verified(headdim, d_state) or headdim_block(headdim, d_state) is not None


def check_cuda_launch(config: dict, headdim: int, d_state: int) -> None:
    """Refuse a CUDA launch outside the verified set (see above)."""
    common = (config["CHUNK"] <= MAX_CHUNK and config.get("num_warps", NUM_WARPS) == NUM_WARPS
              and config.get("num_stages", NUM_STAGES) == NUM_STAGES)
    if "HEADS" in config:
        if not common or (headdim, d_state, config["HEADS"], config["CHUNK"]) not in VERIFIED_MULTIHEAD:
            raise ValueError(f"SSD forward launch {config} for headdim {headdim}, d_state {d_state}: the "
                             f"several-heads kernel runs on CUDA only for the verified (headdim, d_state, heads, "
                             f"chunk) {sorted(VERIFIED_MULTIHEAD)}, {NUM_WARPS} warps, "
                             f"{NUM_STAGES} stage (vision_model/ops/ssd_triton.py VERIFIED_MULTIHEAD)")
        return
    block = headdim_block(headdim, d_state)
    if not common or block is None or config["BLOCK_P"] != block:
        raise ValueError(f"SSD forward launch {config} for headdim {headdim}, d_state {d_state}: on CUDA only chunks of"
                         f" at most {MAX_CHUNK}, {NUM_WARPS} warps, {NUM_STAGES} stage and the whole headdim in one "
                         "block of 64 (headdim a multiple of 64) or 16 (headdim 16, d_state <= 32); other launches "
                         "faulted or gave wrong bf16 results on an H100 with Triton 3.6")


# Fewest chunks per segment: below this the states pass and the hand-over between segments cost more than they save.
MIN_SEGMENT_CHUNKS = 4


def segments_for(programs: int, seqlen: int, chunk: int, sms: int) -> int:
    """How many segments to cut each sequence into so that up to two programs per SM run (never more: more segments
    than that ran slower), each at least `MIN_SEGMENT_CHUNKS` chunks long."""
    return max(1, min(2 * sms // programs, seqlen // (MIN_SEGMENT_CHUNKS * chunk)))


def launch_config(batch: int, heads: int, headdim: int, d_state: int, seqlen: int, device: torch.device) -> dict:
    """Chunk length, headdim block or heads per program, segments, warps and pipeline stages for one call: the
    whole headdim in one block (narrower blocks recompute each chunk's C·Bᵀ and were several times slower where they
    ran right), several heads a program for head dims under 64 where that launch is verified or no one-head launch
    is, and with few programs the sequence cut into segments scanned side by side."""
    chunk = 64
    block_p = headdim_block(headdim, d_state)
    per_program, verified_chunk = heads_per_program(headdim), multihead_chunk(headdim, d_state)
    if per_program is not None and (verified_chunk is not None or block_p is None):
        chunk = verified_chunk or chunk
        layout, programs = {"HEADS": per_program}, batch * triton.cdiv(heads, per_program)
    else:
        block_p = block_p or 16
        layout, programs = {"BLOCK_P": block_p}, batch * heads * triton.cdiv(headdim, block_p)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    segments = segments_for(programs, seqlen, chunk, sms)
    return {"CHUNK": chunk, **layout, "segments": segments, "num_warps": NUM_WARPS, "num_stages": NUM_STAGES}


def ssd_forward_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, dt_bias: Tensor,
                       dt_scale: Tensor | None = None, config: dict | None = None, unverified: bool = False) -> Tensor:
    """y = SSD(x, softplus(dt + dt_bias), A, B, C) + D x, forward only; shapes as in `vision_model.ops.ssd_minimal`
    (x (b, l, h, p), dt (b, l, h) before the softplus, B and C (b, l, g, n)); any layout whose last dim is dense.
    With dt_scale (b, l), dt * dt_scale[..., None] takes dt's place.

    `config` overrides the launch ({"CHUNK", "BLOCK_P" or "HEADS", "segments", "num_warps", "num_stages"}; default
    `launch_config`): "BLOCK_P" runs one head's headdim block a program, "HEADS" that many whole heads of one group a
    program (head dims under 64, C·Bᵀ shared by them; with several groups, heads per group a multiple of it); on
    CUDA it must pass `check_cuda_launch` unless `unverified` (GPU experiments). With s > 1
    segments, a first launch scans segments 1..s-1 of every sequence from a zero state and keeps each one's final
    state and summed log-decay (fp32); the second scans all s segments side by side, each starting from the state
    its predecessors hand over (state_k = exp(decay_k) state_(k-1) + own_k).
    Under Triton's CPU interpreter (TRITON_INTERPRET=1) it runs on CPU tensors: the tests."""
    if triton is None:
        raise RuntimeError("ssd_forward_triton needs Triton")
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if dt.shape != (b, l, h) or B.shape != (b, l, g, n) or C.shape != B.shape or h % g:
        raise ValueError(f"SSD shapes do not match: x {tuple(x.shape)}, dt {tuple(dt.shape)}, "
                         f"B {tuple(B.shape)}, C {tuple(C.shape)}")
    if dt_scale is not None and dt_scale.shape != (b, l):
        raise ValueError(f"dt_scale {tuple(dt_scale.shape)} does not match ({b}, {l})")
    x, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, B, C))
    y = torch.empty((b, l, h, p), dtype=x.dtype, device=x.device)
    config = dict(config or launch_config(b, h, p, n, l, x.device))
    if x.is_cuda and not unverified:
        check_cuda_launch(config, p, n)
    launch = {k: config.pop(k) for k in ("num_warps", "num_stages") if k in config}
    chunk = config["CHUNK"]
    segments = max(1, min(config.pop("segments", 1), triton.cdiv(l, chunk)))
    seg_len = triton.cdiv(triton.cdiv(l, segments), chunk) * chunk  # whole chunks, so segments cut where chunks do
    segments = triton.cdiv(l, seg_len)
    block_n = max(16, triton.next_power_of_2(n))
    saved = segments - 1
    per_program = config.pop("HEADS", None)
    if per_program is not None:
        config.pop("BLOCK_P", None)  # whole heads: no headdim block
    if per_program is not None and ((g > 1 and (h // g) % per_program) or per_program * p & (per_program * p - 1)):
        raise ValueError(f"{per_program} heads a program: needs heads per group ({h // g}, {g} groups) a multiple "
                         f"of it and heads x headdim ({per_program} x {p}) a power of two")
    if saved:
        states = torch.empty((b, h, saved, n, p), dtype=torch.float32, device=x.device)
        totals = torch.empty((b, h, saved), dtype=torch.float32, device=x.device)
    else:  # one segment (MODE 0) reads neither; one-element stand-ins, as some launchers refuse a null pointer
        states = totals = torch.empty(1, dtype=torch.float32, device=x.device)
    scale = dt_scale.float().contiguous() if dt_scale is not None else dt_bias
    args = (x, dt, scale, A.float().contiguous(), B, C, D if D is not None else A, dt_bias.contiguous(), y,
            states, totals, l, h if per_program else p, n, h // g, seg_len, saved,
            *x.stride()[:3], *dt.stride(), *B.stride()[:3], *C.stride()[:3], *y.stride()[:3])
    consts = dict(BLOCK_N=block_n, HAS_D=D is not None, HAS_DT_SCALE=dt_scale is not None,
                  PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 inputs: true fp32 dots, not tf32
                  **config, **launch)
    if per_program:
        kernel, programs = _ssd_forward_heads_kernel, triton.cdiv(h, per_program)
        consts.update(HEADDIM=p, HEADS=per_program)
    else:
        kernel, programs = _ssd_forward_kernel, h * triton.cdiv(p, config["BLOCK_P"])
    if saved:
        kernel[(programs, b, saved)](*args, MODE=1, **consts)
    kernel[(programs, b, segments)](*args, MODE=2 if saved else 0, **consts)
    return y
