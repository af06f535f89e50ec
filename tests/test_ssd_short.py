"""The one-chunk SSD scan (`vision_model.ops.ssd_short`): its PyTorch definition against the chunked and recurrent
ones, and the Triton forward and backward (in Triton's CPU interpreter, which tests/conftest.py turns on) against
autograd through the definition in float64; the `short_scan` training fusion's switch."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vision_model.ops.ssd_minimal import ssd_chunked, ssd_recurrent
from vision_model.ops.ssd_short import (MAX_LEN, default_config, short_scan_preferred, short_scan_supported,
                                        ssd_short_ref, ssd_short_scan_ref)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(b, l, h, p, g, n, seed=0, with_d=True, strided=False):
    """Raw (pre-softplus) inputs as the block passes them; `strided`: x, B, C and dt as views into one wider
    tensor, as the split of in_proj's and the conv's outputs are."""
    torch.manual_seed(seed)
    if strided:
        wide = torch.randn(b, l, h * p + 2 * g * n + h + 3)
        x = wide[..., :h * p].unflatten(-1, (h, p))
        B = wide[..., h * p:h * p + g * n].unflatten(-1, (g, n))
        C = wide[..., h * p + g * n:h * p + 2 * g * n].unflatten(-1, (g, n))
        dt = wide[..., h * p + 2 * g * n:h * p + 2 * g * n + h] - 1.0
    else:
        x, B, C = torch.randn(b, l, h, p), torch.randn(b, l, g, n), torch.randn(b, l, g, n)
        dt = torch.randn(b, l, h) - 1.0
    B, C = B / n ** 0.5, C / n ** 0.5
    A = -torch.empty(h).uniform_(0.3, 3.0)
    D = torch.randn(h) if with_d else None
    dt_bias = torch.randn(h) * 0.5
    return x, dt, A, B, C, D, dt_bias


@pytest.mark.parametrize("shape", [(2, 1, 3, 8, 1, 16), (1, 37, 4, 16, 2, 16), (2, 64, 2, 32, 1, 64),
                                   (1, 145, 8, 16, 1, 64), (1, 200, 6, 16, 3, 16), (2, 256, 2, 8, 1, 16)])
def test_ssd_short_ref_equals_chunked_and_recurrent(shape):
    b, l, h, p, g, n = shape
    x, dt, A, B, C, D, dt_bias = (t.double() if t is not None else None for t in _inputs(*shape))
    dt = F.softplus(dt + dt_bias)
    y = ssd_short_ref(x, dt, A, B, C, D)
    assert _rel(y, ssd_chunked(x, dt, A, B, C, D, chunk_size=64)) < 1e-12
    assert _rel(y, ssd_chunked(x, dt, A, B, C, D, chunk_size=256)) < 1e-12
    if l <= 64:
        assert _rel(y, ssd_recurrent(x, dt, A, B, C, D)) < 1e-12


def test_ssd_short_ref_refuses_more_than_one_chunk():
    x, dt, A, B, C, D, _ = _inputs(1, MAX_LEN + 1, 1, 8, 1, 16)
    with pytest.raises(ValueError, match="at most 256"):
        ssd_short_ref(x, dt, A, B, C, D)
    assert short_scan_supported(MAX_LEN, 64, 128) and not short_scan_supported(MAX_LEN + 1, 16, 64)
    assert short_scan_preferred(145, 16, 64) and short_scan_preferred(197, 16, 128)
    assert not short_scan_preferred(197, 64, 128) and not short_scan_preferred(145, 16, 256)


# (batch, length, heads, headdim, groups, d_state, launch config or None for the default, with D, strided inputs):
# lengths 1, 5, 37, 40, 64, 145, 200 (none but 64 a multiple of the blocks), 1 to 8 heads, head dims 8/16/32,
# d_state 16/64/128, one and two groups (and 3 heads a group: programs of 2 and 4 heads run short), HEADS 1/2/4/8,
# blocks 16/32/64
CASES = [
    (2, 1, 3, 8, 1, 16, None, True, False),
    (1, 5, 2, 16, 2, 16, dict(BLOCK=16, HEADS=1), True, True),
    (2, 37, 4, 16, 1, 64, None, True, True),
    (1, 37, 6, 8, 2, 16, dict(BLOCK=16, HEADS=2), False, False),
    (1, 64, 8, 8, 1, 16, dict(BLOCK=32, HEADS=8), True, False),
    (1, 64, 3, 32, 1, 64, dict(BLOCK=64, HEADS=2), True, True),
    (1, 145, 4, 16, 1, 64, None, True, True),
    (1, 145, 6, 16, 2, 16, dict(BLOCK=32, HEADS=4), True, False),
    (1, 200, 8, 8, 1, 16, dict(BLOCK=64, HEADS=8), True, False),
    (1, 40, 4, 16, 1, 128, None, True, False),
]


def _case_id(c) -> str:
    return str(c[:6]) + ("" if c[6] is None else str(tuple(c[6].values())))


# the diagonal tiles pairwise and factored in both passes, and each pass's default (the forward factored, the
# backward pairwise) where the case takes the default launch
DIAGONALS = ([(c, d) for c in CASES for d in ("pairwise", "factored")]
             + [(c, "default") for c in CASES if c[6] is None])


@pytest.mark.parametrize("case,diagonal", DIAGONALS, ids=[f"{_case_id(c)}-{d}" for c, d in DIAGONALS])
def test_triton_short_scan_equals_reference(case, diagonal):
    """Forward against the definition and the chunked scan, every gradient (x, dt, A, B, C, D, dt_bias) against
    autograd through the definition in float64, through the autograd Function; fp32, relative error <= 1e-4; with
    the diagonal tiles pairwise, factored, and as each pass does by default (these inputs' decays across a block are
    within DIAG_SPAN)."""
    pytest.importorskip("triton")
    from vision_model.ops.ssd_short import ssd_short_scan
    b, l, h, p, g, n, config, with_d, strided = case
    if diagonal != "default":
        config = dict(config or default_config(l, h // g, p), FACTOR_DIAG=diagonal == "factored")
    inputs = _inputs(b, l, h, p, g, n, seed=l + h, with_d=with_d, strided=strided)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y = ssd_short_scan(*leaves, fwd_config=config, bwd_config=config)
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    y_ref = ssd_short_scan_ref(*ref_leaves)
    x, dt, A, B, C, D, dt_bias = inputs
    y_chunked = ssd_chunked(x, F.softplus(dt + dt_bias), A, B, C, D, chunk_size=64)
    assert y.dtype == torch.float32 and y.shape == (b, l, h, p)
    assert _rel(y, y_ref) < 1e-5 and _rel(y, y_chunked) < 1e-5

    dy = torch.randn(b, l, h, p, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    ref = torch.autograd.grad(y_ref, [t for t in ref_leaves if t is not None], dy.double())
    names = ["x", "dt", "A", "B", "C"] + (["D"] if with_d else []) + ["dt_bias"]
    for name, a, r, leaf in zip(names, got, ref, [t for t in leaves if t is not None]):
        assert a.shape == leaf.shape and a.dtype == leaf.dtype, name
        assert _rel(a, r) < 1e-4, (name, _rel(a, r))


def test_forward_refuses_blocks_longer_than_wide():
    """64-token blocks of 32 columns computed wrong forwards on the H200 (notes 18.12): such a launch is refused."""
    pytest.importorskip("triton")
    from vision_model.ops.ssd_short import ssd_short_forward
    x, dt, A, B, C, D, dt_bias = _inputs(1, 70, 2, 16, 1, 16)
    with pytest.raises(ValueError, match="64-token blocks"):
        ssd_short_forward(x, dt, A, B, C, D, dt_bias, dict(BLOCK=64, HEADS=2))


def test_default_config_serves_every_head_shape():
    """About 64 x columns a program (HEADS x headdim), never more heads than a group has, 16-token blocks only for
    the shortest sequences."""
    assert default_config(145, 48, 16) == {"BLOCK": 32, "HEADS": 4, "FACTOR_DIAG": False, "num_warps": 4,
                                           "num_stages": 1}
    assert default_config(37, 32, 16)["HEADS"] == 4 and default_config(197, 64, 16)["BLOCK"] == 32
    assert default_config(145, 48, 32)["HEADS"] == 2
    assert default_config(5, 3, 8)["HEADS"] == 4 and default_config(5, 1, 8)["HEADS"] == 1
    assert default_config(10, 6, 64)["HEADS"] == 1 and default_config(10, 6, 64)["BLOCK"] == 16
    assert default_config(145, 48, 16, factor_diag=True)["FACTOR_DIAG"]


def test_short_scan_fusion_switch(tmp_path):
    """`short_scan` is a training fusion like the others (train_fusions, `matsearch bench train --off`); on CPU the
    block takes the PyTorch scan with it on or off (the Triton dispatch needs CUDA tensors), so the two agree
    exactly."""
    import vision_model
    from app.cli import main as matsearch
    from vision_model.ops.backends import TrainFusions, train_fusions
    assert "short_scan" in TrainFusions.names() and TrainFusions().short_scan
    torch.manual_seed(0)
    model = vision_model.create_model("matmamba_vision_fmnist", depth=2, d_model=64, d_state=16,
                                      drop_path_rate=0.0).train()
    x = torch.randn(2, 1, 28, 28)
    outs, grads = [], []
    for flags in ({}, dict(short_scan=False)):
        model.zero_grad()
        with train_fusions(**flags) as fusions:
            assert fusions.short_scan == (not flags)
            out = model(x, level=2)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    assert matsearch(["bench", "train", "--device", "cpu", "--tiny", "--levels", "1", "--schedules", "",
                      "--vits", "--no-forward", "--repeats", "1", "--warmup", "0", "--off", "short_scan",
                      "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "train_speed.json").read_text())["rows"]
    assert rows[0]["fusions_off"] == ["short_scan"] and rows[0]["status"] == "ok"


def test_gpu_check_script_tiny_on_cpu(tmp_path):
    """benchmarks/gpu/ssd_short_check.py on CPU (--tiny, Triton's interpreter, fp32): the float64 correctness rows
    (every tensor, repeats bit-identical), the kernel timings, and the launch sweep in its child process, each
    config agreeing with the default launch; results in the jsonl and the summary."""
    pytest.importorskip("triton")
    from benchmarks.gpu import ssd_short_check
    assert ssd_short_check.main(["--device", "cpu", "--tiny", "--sections", "1,2,6", "--repeats", "1",
                                 "--variants", "default,factored", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ssd_short.jsonl").read_text().splitlines()]
    corr = [r for r in rows if r["section"] == "correctness"]
    assert len(corr) == 4 and all(r["repeat_identical"] for r in corr)
    assert {r["impl"] for r in corr} == {"ours", "ours-factored"}
    assert all(e["rel"] < 1e-4 and e["max"] < 1e-4 for r in corr for e in r["errors"].values())
    assert set(corr[0]["errors"]) == {"y", "x", "dt", "A", "B", "C", "D", "dt_bias"}
    assert len([r for r in rows if r["section"] == "kernel time"]) == 4
    sweep = [r for r in rows if r["section"] == "sweep"]
    assert {r["shape"] for r in sweep} == {"tiny", "tiny short"} and {r["kind"] for r in sweep} == {"fwd", "bwd"}
    assert all(r["status"] == "ok" and r["rel_vs_default"] < 1e-5 for r in sweep)
    summary = (tmp_path / "summary.md").read_text()
    assert "best bwd at tiny:" in summary and "| ours | tiny | float32 | True |" in summary


@pytest.mark.parametrize("factor", [False, True], ids=["pairwise-diagonal", "factored-diagonal"])
def test_triton_short_scan_with_decays_from_none_to_total(factor):
    """Heads whose decay spans the whole sequence, a block, a token and far less than a token (dt·A from -0.02 to
    about -500 a token): the factored exponents stay <= 0, nothing overflows, every gradient stays exact. With
    FACTOR_DIAG, a program of slow heads factors its diagonal tiles and one holding a fast head falls back to the
    pairwise tiles, in one launch."""
    pytest.importorskip("triton")
    from vision_model.ops.ssd_short import ssd_short_scan as scan
    x, dt, A, B, C, D, dt_bias = _inputs(1, 100, 8, 16, 1, 16, seed=3)
    A = -torch.tensor([0.01, 0.05, 0.1, 0.3, 0.01, 2.0, 30.0, 200.0])
    inputs = [x, dt + 2.0, A, B, C, D, dt_bias]
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    config = dict(BLOCK=32, HEADS=4, FACTOR_DIAG=factor)
    y, y_ref = scan(*leaves, fwd_config=config, bwd_config=config), ssd_short_scan_ref(*ref_leaves)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(y, leaves, dy)
    ref = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    assert _rel(y, y_ref) < 1e-5
    for name, a, r in zip(["x", "dt", "A", "B", "C", "D", "dt_bias"], got, ref):
        assert torch.isfinite(a).all() and _rel(a, r) < 1e-4, name
