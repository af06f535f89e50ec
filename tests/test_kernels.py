"""The Triton kernels of vision_model/ops against their readable references (the `*_ref` beside each kernel, and the
float64 SSD recurrence), run on CPU tensors by Triton's interpreter: conftest.py sets TRITON_INTERPRET=1 before
anything defines a kernel. One case per shape / dtype / option, so a failure names its case."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1)")

from vision_model.ops.conv import causal_conv1d_silu_ref, causal_conv1d_silu_triton  # noqa: E402
from vision_model.ops.patchify import (add_token_table_ref, add_token_table_triton, patchify_ref,  # noqa: E402
                                       patchify_triton)
from vision_model.ops.rmsnorm import (gated_rms_norm_ref, rms_norm_ref, rms_norm_triton, rms_rstd_triton,  # noqa: E402
                                      row_rstd_ref)
from vision_model.ops import ssd_triton  # noqa: E402
from vision_model.ops.ssd_minimal import ssd_chunked, ssd_recurrent  # noqa: E402
from vision_model.ops.ssd_triton import (check_cuda_launch, fused_forward_supported, launch_config,  # noqa: E402
                                         segments_for, ssd_forward_triton)


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


# -- causal conv1d + SiLU ------------------------------------------------------------------------------------------

@interpreted
@pytest.mark.parametrize("b, l, c, k, with_bias, scaled", [
    (2, 197, 80, 4, True, False),  # l and c not multiples of the tiles
    (3, 50, 300, 4, False, False),  # no bias, several channel blocks
    (1, 1, 17, 3, True, False),  # a sequence shorter than the kernel
    (2, 70, 130, 2, True, False),
    (2, 70, 130, 4, True, True),  # each row scaled first (the pre-norm's rstd, folded into in_proj)
    (1, 3, 17, 4, False, True),
])
def test_causal_conv_kernel_equals_reference(b, l, c, k, with_bias, scaled):
    torch.manual_seed(0)
    wide = torch.randn(b, l, c + 40)
    x = wide[..., 10:10 + c]  # a strided view, as the block's x|B|C slice of in_proj's output is
    w, bias = torch.randn(c, 1, k), (torch.randn(c) if with_bias else None)
    scale = torch.rand(b, l) + 0.1 if scaled else None
    y = causal_conv1d_silu_triton(x, w, bias, scale, block_l=16, block_c=64)
    ref = causal_conv1d_silu_ref(x, w, bias, scale)
    if scaled:  # the reference scales by multiplying its input
        torch.testing.assert_close(ref, causal_conv1d_silu_ref(x * scale[..., None], w, bias))
    assert y.shape == ref.shape and y.is_contiguous()
    assert max_rel_err(y, ref) < 1e-6


# -- RMSNorm -------------------------------------------------------------------------------------------------------

@interpreted
@pytest.mark.parametrize("shape, n, gated, rows, dtype", [
    ((2, 37), 96, None, 4, torch.float32),  # a ragged last tile
    ((3, 11), 200, "gated", 4, torch.float32),  # a width that is not a power of two
    ((1, 5), 64, "gated", 1, torch.float32),  # one row per program
    ((2, 33), 256, "gated", 16, torch.float16),
    ((2, 33), 1024, None, None, torch.float16),  # the default launch
    ((3, 11), 200, "scaled", 4, torch.float32),  # z times a per-row scale (the pre-norm's rstd)
    ((2, 33), 256, "scaled", None, torch.float16),
])
def test_rms_norm_kernel_equals_reference(shape, n, gated, rows, dtype):
    torch.manual_seed(0)
    x = torch.randn(*shape, n).to(dtype)
    w = (torch.rand(n) + 0.5).to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    rstd = rms_rstd_triton(x, 1e-5)
    assert rstd.shape == shape and rstd.dtype == torch.float32
    assert max_rel_err(rstd, row_rstd_ref(x, 1e-5)) < 1e-5
    if gated:
        z = torch.randn(*shape, n + 24).to(dtype)[..., 7:7 + n]  # strided: the block's z is a slice of in_proj's
        s = torch.rand(*shape) + 0.5 if gated == "scaled" else None
        y = rms_norm_triton(x, w, 1e-5, z=z, z_scale=s, rows_per_program=rows)
        ref = gated_rms_norm_ref(x, z, w, 1e-5, z_scale=s)
        if s is not None:  # the reference scales by multiplying z
            torch.testing.assert_close(ref.float(), gated_rms_norm_ref(x.float(), z.float() * s[..., None],
                                                                       w.float(), 1e-5), rtol=tolerance, atol=tolerance)
    else:
        y, ref = rms_norm_triton(x, w, 1e-5, rows_per_program=rows), rms_norm_ref(x.float(), w.float(), 1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    assert max_rel_err(y, ref) < tolerance


# -- patch rows and the token table --------------------------------------------------------------------------------

@interpreted
@pytest.mark.parametrize("b, t, d", [(3, 17, 96), (2, 5, 1024), (1, 3, 5000), (4, 50, 192)])
def test_token_table_kernel_equals_reference(b, t, d):
    """Widths below, at and above one program's 4096 values, ragged row tiles."""
    torch.manual_seed(0)
    tokens, table = torch.randn(b, t, d), torch.randn(t, d)
    want = add_token_table_ref(tokens.clone(), table)
    assert add_token_table_triton(tokens, table) is tokens  # in place
    assert torch.equal(tokens, want)


@interpreted
@pytest.mark.parametrize("b, c, h, w, p", [
    (2, 3, 32, 48, 16), (1, 1, 12, 8, 4), (3, 2, 16, 40, 8),
    (1, 2, 16, 320, 16),  # 320 px at patch 16: two column blocks of 256, the second ragged
])
def test_patchify_kernel_equals_reference(b, c, h, w, p):
    torch.manual_seed(0)
    x = torch.randn(b, c, h, w)
    out = torch.full((b, (h // p) * (w // p) + 1, c * p * p), 7.0)  # one extra (CLS) row, left alone
    assert patchify_triton(x, p, out) is out
    assert torch.equal(out[:, :-1], patchify_ref(x, p)) and bool((out[:, -1] == 7.0).all())
    into = torch.full_like(out, 7.0)
    assert torch.equal(patchify_ref(x, p, into), out)  # the reference's buffer form: the same contract


# -- the one-kernel SSD forward ------------------------------------------------------------------------------------

@interpreted
@pytest.mark.parametrize("b, l, h, p, n, g, with_d, cfg", [
    (2, 70, 3, 16, 32, 1, True, dict(CHUNK=16, BLOCK_P=16)),  # several chunks with a ragged end
    (1, 9, 2, 16, 16, 1, True, dict(CHUNK=32, BLOCK_P=16)),  # shorter than one chunk
    (2, 40, 2, 32, 20, 1, True, dict(CHUNK=16, BLOCK_P=16)),  # headdim split over two programs
    (1, 33, 4, 16, 16, 2, False, dict(CHUNK=16, BLOCK_P=16)),  # two B/C groups, no D
    (2, 70, 3, 16, 32, 1, True, dict(CHUNK=16, BLOCK_P=16, segments=3)),  # the sequence cut into segments
    (1, 100, 2, 32, 20, 1, True, dict(CHUNK=16, BLOCK_P=16, segments=4)),  # a ragged last segment
    (1, 33, 4, 16, 16, 2, False, dict(CHUNK=16, BLOCK_P=16, segments=8)),  # more segments than chunks
    (2, 70, 3, 16, 32, 1, True, dict(CHUNK=16, BLOCK_P=16, dt_scale=True)),  # dt scaled per row (the pre-norm)
    (1, 100, 2, 32, 20, 1, True, dict(CHUNK=16, BLOCK_P=16, segments=4, dt_scale=True)),
], ids=lambda arg: "-".join(f"{k}{v}" for k, v in arg.items()) if isinstance(arg, dict) else None)
def test_ssd_forward_kernel_equals_recurrence(b, l, h, p, n, g, with_d, cfg):
    """fp32 in the interpreter against the float64 step-by-step recurrence; x, B, C and dt are strided views of one
    in_proj output, as in the block."""
    torch.manual_seed(0)
    cfg = dict(cfg)
    inner = h * p
    zxbcdt = torch.randn(b, l, 2 * inner + 2 * g * n + h)
    x = zxbcdt[..., inner:2 * inner].unflatten(-1, (h, p))
    B = zxbcdt[..., 2 * inner:2 * inner + g * n].unflatten(-1, (g, n))
    C = zxbcdt[..., 2 * inner + g * n:2 * inner + 2 * g * n].unflatten(-1, (g, n))
    dt = zxbcdt[..., 2 * inner + 2 * g * n:] - 1
    dt_bias, A = torch.rand(h) - 3, -torch.rand(h) * 8
    D = torch.randn(h) if with_d else None
    scale = torch.rand(b, l) + 0.5 if cfg.pop("dt_scale", False) else None
    y = ssd_forward_triton(x, dt, A, B, C, D, dt_bias, dt_scale=scale, config=cfg)
    dt = dt if scale is None else dt * scale[..., None]
    ref = ssd_recurrent(*(t.double() for t in (x, F.softplus(dt + dt_bias), A, B, C)),
                        None if D is None else D.double())
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_ssd_forward_launch_policy(monkeypatch):
    """The one-kernel SSD forward cuts sequences into segments only when its (batch, head) programs leave the GPU
    (here 132 SMs) under-filled, never into segments of fewer than 4 chunks; on CUDA it runs only the launches that
    were verified on the GPU (whole headdim in one block, 64-long chunks, 4 warps, one stage) and leaves other head
    shapes to mamba-ssm."""
    assert segments_for(programs=16 * 32, seqlen=4097, chunk=64, sms=132) == 1  # 135M, 1024 px, D: GPU full
    assert segments_for(programs=16 * 16, seqlen=4097, chunk=64, sms=132) == 1  # D/2: 256 programs, ~2 per SM
    assert segments_for(programs=16 * 8, seqlen=4097, chunk=64, sms=132) == 2  # D/4: 128 -> 256 programs
    assert segments_for(programs=4, seqlen=16385, chunk=64, sms=132) == 64  # batch 1 at 2048 px, D/8: 256-token cuts
    assert segments_for(programs=4, seqlen=4097, chunk=64, sms=132) == 16  # batch 1 at 1024 px, D/8
    assert segments_for(programs=4, seqlen=197, chunk=64, sms=132) == 1  # 224 px query: too short to cut
    # the 135M-fast config (headdim 64, d_state 128) and the Fashion-MNIST model (16, 32) run it; the paper's 35M
    # (16, 128) not, while no several-heads launch is verified
    monkeypatch.setattr(ssd_triton, "VERIFIED_MULTIHEAD", set())
    assert fused_forward_supported(64, 128) and fused_forward_supported(128, 128) and fused_forward_supported(16, 32)
    assert not fused_forward_supported(16, 128) and not fused_forward_supported(32, 64)
    for headdim, d_state in ((64, 128), (16, 32)):
        config = launch_config(1, 4, headdim, d_state, 197, torch.device("cpu"))
        assert config["BLOCK_P"] == headdim and config["num_stages"] == 1 and config["num_warps"] == 4
        check_cuda_launch(config, headdim, d_state)  # the default launch passes its own check
    good = dict(CHUNK=64, BLOCK_P=64, num_warps=4, num_stages=1)
    for bad, headdim, d_state in ((dict(good, CHUNK=128), 64, 128), (dict(good, num_warps=8), 64, 128),
                                  (dict(good, num_stages=2), 64, 128), (dict(good, BLOCK_P=16), 64, 128),
                                  (dict(good, BLOCK_P=16), 16, 128)):
        with pytest.raises(ValueError, match="on CUDA only chunks of at most 64, 4 warps, 1 stage"):
            check_cuda_launch(bad, headdim, d_state)


# -- the several-heads-a-program SSD forward (head dims under 64: C·Bᵀ shared by the heads of a program) ---------

def _ssd_inputs(b, l, h, p, n, with_d, scaled, seed=0):
    """x, dt, A, B, C, D, dt_bias, dt_scale as the block passes them: x, B, C, dt strided views of one in_proj row."""
    g = torch.Generator().manual_seed(seed)
    inner = h * p
    zxbcdt = torch.randn(b, l, 2 * inner + 2 * n + h, generator=g)
    x = zxbcdt[..., inner:2 * inner].unflatten(-1, (h, p))
    B = zxbcdt[..., 2 * inner:2 * inner + n].unflatten(-1, (1, n))
    C = zxbcdt[..., 2 * inner + n:2 * inner + 2 * n].unflatten(-1, (1, n))
    dt = zxbcdt[..., 2 * inner + 2 * n:] - 1
    dt_bias, A = torch.rand(h, generator=g) - 3, -torch.rand(h, generator=g) * 8
    D = torch.randn(h, generator=g) if with_d else None
    scale = torch.rand(b, l, generator=g) + 0.5 if scaled else None
    return x, dt, A, B, C, D, dt_bias, scale


@interpreted
@pytest.mark.parametrize("b, l, h, p, n, heads, segments, with_d, scaled", [
    (2, 37, 4, 16, 16, 4, 1, True, False),  # the 35M's head dim, four heads a program, ragged last chunk
    (1, 53, 8, 16, 128, 4, 1, False, True),  # the paper's d_state, two programs, no D, dt scaled per row
    (2, 41, 4, 32, 32, 2, 1, True, True),  # the 135M's head dim, two heads a program
    (1, 29, 2, 32, 128, 2, 1, True, False),  # 135M head shape, sequence shorter than two chunks
    (1, 70, 6, 32, 64, 2, 3, True, True),  # segments: three, the last ragged
    (2, 45, 8, 16, 48, 4, 4, False, False),  # d_state not a power of two (padded), four segments
    (1, 23, 6, 16, 16, 4, 1, True, False),  # heads not a multiple of heads-a-program: the last program half empty
    (1, 33, 3, 32, 16, 2, 8, True, True),  # more segments than chunks, an odd head count
    (1, 19, 4, 8, 16, 8, 1, True, True),  # eight heads of 8 in a 64-wide block
], ids=lambda v: str(v))
def test_ssd_forward_heads_kernel_equals_reference(b, l, h, p, n, heads, segments, with_d, scaled):
    """fp32 in the interpreter against `ssd_minimal` (float64 chunked scan and step-by-step recurrence)."""
    x, dt, A, B, C, D, dt_bias, scale = _ssd_inputs(b, l, h, p, n, with_d, scaled)
    y = ssd_forward_triton(x, dt, A, B, C, D, dt_bias, dt_scale=scale,
                           config=dict(CHUNK=16, HEADS=heads, segments=segments))
    dt_eff = dt if scale is None else dt * scale[..., None]
    args = [t.double() for t in (x, F.softplus(dt_eff + dt_bias), A, B, C)] + [None if D is None else D.double()]
    assert y.shape == x.shape and y.dtype == x.dtype
    assert max_rel_err(y, ssd_chunked(*args, chunk_size=16)) < 1e-4
    assert max_rel_err(y, ssd_recurrent(*args)) < 1e-4


@interpreted
def test_ssd_forward_heads_kernel_equals_one_head_kernel():
    """The same inputs through both kernels (their default launches off CUDA: several heads a program for head dim
    32, d_state 128, and one 16-wide block a program) agree to fp32 rounding."""
    x, dt, A, B, C, D, dt_bias, scale = _ssd_inputs(1, 66, 4, 32, 128, True, True, seed=3)
    assert "HEADS" in launch_config(1, 4, 32, 128, 66, torch.device("cpu"))
    y = ssd_forward_triton(x, dt, A, B, C, D, dt_bias, dt_scale=scale)
    y_one = ssd_forward_triton(x, dt, A, B, C, D, dt_bias, dt_scale=scale, config=dict(CHUNK=16, BLOCK_P=16))
    assert max_rel_err(y, y_one) < 1e-5


def test_ssd_forward_heads_shortest_verified_chunk(monkeypatch):
    """With a head shape verified at two chunk lengths the launch takes the shorter, and only verified lengths pass
    the CUDA gate."""
    monkeypatch.setattr(ssd_triton, "VERIFIED_MULTIHEAD", {(16, 128, 4, 64), (16, 128, 4, 32)})
    config = launch_config(16, 64, 16, 128, 4097, torch.device("cpu"))
    assert config["HEADS"] == 4 and config["CHUNK"] == 32
    check_cuda_launch(config, 16, 128)
    check_cuda_launch(dict(config, CHUNK=64), 16, 128)
    with pytest.raises(ValueError, match="several-heads kernel"):
        check_cuda_launch(dict(config, CHUNK=16), 16, 128)
    assert launch_config(16, 64, 32, 128, 4097, torch.device("cpu"))["CHUNK"] == 64  # head dim 32: none verified


def test_ssd_forward_heads_launch_gate(monkeypatch):
    """Head dims 32 and 16 with d_state 128 (the paper's shapes) take the several-heads kernel on CUDA only once a GPU
    run has put the launch in the verified table; until then they go to mamba-ssm, and a forced launch is refused."""
    monkeypatch.setattr(ssd_triton, "VERIFIED_MULTIHEAD", set())
    config = launch_config(16, 64, 32, 128, 4097, torch.device("cpu"))
    assert config["HEADS"] == 2 and config["CHUNK"] == 64 and config["segments"] == 1
    assert launch_config(16, 64, 16, 128, 4097, torch.device("cpu"))["HEADS"] == 4
    assert not fused_forward_supported(32, 128) and not fused_forward_supported(16, 128)
    with pytest.raises(ValueError, match="several-heads kernel runs on CUDA only for the verified"):
        check_cuda_launch(config, 32, 128)
    monkeypatch.setattr(ssd_triton, "VERIFIED_MULTIHEAD", {(32, 128, 2, 64)})
    assert fused_forward_supported(32, 128) and not fused_forward_supported(16, 128)
    check_cuda_launch(config, 32, 128)
    for bad in (dict(config, num_warps=8), dict(config, CHUNK=128), dict(config, CHUNK=32), dict(config, HEADS=1)):
        with pytest.raises(ValueError, match="several-heads kernel"):
            check_cuda_launch(bad, 32, 128)
    # a verified several-heads launch is preferred to the verified one-head 16-wide block at d_state <= 32
    monkeypatch.setattr(ssd_triton, "VERIFIED_MULTIHEAD", {(16, 32, 4, 64)})
    assert launch_config(1, 12, 16, 32, 197, torch.device("cpu"))["HEADS"] == 4
    with pytest.raises(ValueError, match="heads a program"):
        x, dt, A, B, C, D, dt_bias, _ = _ssd_inputs(1, 8, 4, 12, 16, False, False)
        ssd_forward_triton(x, dt, A, B, C, D, dt_bias, config=dict(CHUNK=16, HEADS=2))


def test_official_speed_script_smoke(tmp_path):
    """benchmarks/gpu/official_speed.py --smoke (its own process: it switches Triton to the interpreter and stubs
    CUDA device contexts): every candidate launch passes its checks in the interpreter, and the speed table has the
    new path (the candidates added) and the current path (the committed launches) at every level."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu.official_speed", "--smoke", "--sizes", "32",
                           "--models", "35m", "--out", str(tmp_path)], cwd=repo, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "official_speed.json").read_text())
    from benchmarks.gpu.official_speed import CANDIDATES
    assert sorted(map(tuple, result["passed"])) == sorted(CANDIDATES)
    rows = {(r["impl"], r["level"]): r for r in result["speed"] if r["model"] == "35m"}
    for impl in ("ours-new", "ours-current"):
        assert all(rows[(impl, lv)].get("img_s", 0) > 0 for lv in (1, 2, 4, 8)), rows
    assert "PASS" in (tmp_path / "official_speed.md").read_text()
