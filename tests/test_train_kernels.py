"""The training step's fused paths against their references: the Triton conv backward (in Triton's CPU
interpreter), the training block, the shared stem and the sampled schedule, and `matsearch bench train`."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import vision_model
from app.cli import main as matsearch
from training.train import TrainConfig, level_losses, param_groups, step_levels, train_step
from vision_model.ops.backends import TrainFusions, train_fusions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (batch, length, channels, kernel, bias, channel tile, sequence groups): channels not a multiple of the tile, a
# sequence shorter than the kernel, several sequences per program with a short last group, one- and two-tap kernels
CONV_CASES = [(2, 37, 80, 4, True, 32, None), (3, 5, 17, 3, False, 32, 2), (2, 70, 130, 2, True, 64, 1),
              (1, 1, 9, 4, True, 16, None), (5, 19, 48, 4, True, 32, 2), (2, 6, 24, 1, True, 16, None)]

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c[:5]) for c in CONV_CASES])
def test_triton_conv_backward_equals_reference_gradients(case):
    """dx, dweight, dbias of the Triton backward (through the autograd Function and at explicit tilings) against
    autograd through F.conv1d, fp32, in Triton's CPU interpreter (tests/conftest.py turns it on)."""
    pytest.importorskip("triton")
    from vision_model.ops.conv import causal_conv1d_silu_bwd_triton, causal_conv1d_silu_ref, causal_conv1d_silu_train
    b, l, c, k, with_bias, block_c, groups = case
    torch.manual_seed(0)
    wide = torch.randn(b, l, c + 20)
    x = wide[..., 5:5 + c]  # a strided view, as the block's x|B|C slice of in_proj's output is
    w, bias = torch.randn(c, 1, k), (torch.randn(c) if with_bias else None)
    dy = torch.randn(b, l, c)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, bias)]
    y_ref = causal_conv1d_silu_ref(*leaves)
    ref = torch.autograd.grad(y_ref, [t for t in leaves if t is not None], dy)
    leaves_t = [t.clone().requires_grad_() if t is not None else None for t in (x, w, bias)]
    y = causal_conv1d_silu_train(*leaves_t)
    got = torch.autograd.grad(y, [t for t in leaves_t if t is not None], dy)
    # the kernel's own tiling, as the autograd Function does not choose it
    direct = causal_conv1d_silu_bwd_triton(x, w, bias, dy, block_c=block_c, programs=groups)
    assert all(a.shape == r.shape and a.dtype == r.dtype for a, r in zip(got, ref))
    errors = [_rel(y, y_ref)] + [_rel(a, r) for a, r in zip(got, ref)]
    errors += [_rel(a, r) for a, r in zip([t for t in direct if t is not None], ref)]
    assert max(errors) < 1e-4, errors


# (leading shape, width, rows a program, programs): a width not a power of two, a short last tile, programs walking
# several tiles, more programs than tiles
NORM_CASES = [((2, 37), 80, None, None), ((3, 5), 17, 2, 3), ((1, 70), 130, 4, 1), ((4,), 48, 8, 16)]


@pytest.mark.parametrize("case", NORM_CASES, ids=[str(c[:2]) for c in NORM_CASES])
def test_triton_gated_norm_backward_equals_reference_gradients(case):
    """dy, dz, dweight of the gated RMSNorm's Triton backward (through the autograd Function and at explicit
    launches) against autograd through `gated_rms_norm_ref`, fp32, in Triton's CPU interpreter; z is a strided view,
    as the block's slice of in_proj's output is."""
    pytest.importorskip("triton")
    from vision_model.ops.rmsnorm import gated_rms_norm_bwd_triton, gated_rms_norm_ref, gated_rms_norm_train
    lead, n, rows, programs = case
    torch.manual_seed(0)
    y, w, dout = torch.randn(*lead, n), torch.rand(n) + 0.5, torch.randn(*lead, n)
    z = torch.randn(*lead, n + 7)[..., 3:3 + n]
    leaves = [t.clone().requires_grad_() for t in (y, z, w)]
    out_ref = gated_rms_norm_ref(*leaves, 1e-5)
    ref = torch.autograd.grad(out_ref, leaves, dout)
    leaves_t = [t.clone().requires_grad_() for t in (y, z, w)]
    out = gated_rms_norm_train(*leaves_t, 1e-5)
    got = torch.autograd.grad(out, leaves_t, dout)
    direct = gated_rms_norm_bwd_triton(y, z, w, dout, 1e-5, rows_per_program=rows, programs=programs)
    assert all(a.shape == r.shape and a.dtype == r.dtype for a, r in zip(got, ref))
    errors = [_rel(out, out_ref)] + [_rel(a, r) for a, r in zip(got, ref)] + [_rel(a, r) for a, r in zip(direct, ref)]
    assert max(errors) < 1e-4, errors


# -- the training block and step (PyTorch backend: the fusions that exist on every device) ----------------------

def _tiny(seed: int = 0, **overrides) -> vision_model.MatMambaVision:
    torch.manual_seed(seed)
    kw = dict(depth=2, d_model=64, d_state=16, drop_path_rate=0.0)
    kw.update(overrides)
    return vision_model.create_model("matmamba_vision_fmnist", **kw).train()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a: dict, b: dict, tol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    worst = max(_rel(a[n], b[n]) for n in a)
    assert worst < tol, worst


@pytest.mark.parametrize("level", [1, 4])
def test_training_block_equals_the_inference_block_with_autograd(level):
    """Block.forward (the training path: norm into in_proj, one split) and the earlier path (the inference block
    under autograd, three slices) give the same output and gradients at a full and a nested width."""
    model = _tiny()
    x = torch.randn(3, 1, 28, 28)
    outs, grads = [], []
    for flags in ({}, dict(block=False, split=False)):
        model.zero_grad()
        with train_fusions(**flags):
            out = model(x, level=level)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append(_grads(model))
    assert _rel(outs[0], outs[1]) < 1e-5
    _assert_same_grads(grads[0], grads[1])


@pytest.mark.parametrize("fusion", ["reorder_gather", "stem_channels_last"])
def test_reorder_gather_and_channels_last_stem_keep_outputs_and_gradients(fusion):
    """The scan-order reorders backpropagated by the inverse gather, and the conv stem on channels-last images,
    against autograd's indexing and the NCHW stem: same output and gradients, through every scan order."""
    model = _tiny(depth=5, scan_orders=("row", "row_rev", "col", "col_rev"))
    x = torch.randn(3, 1, 28, 28)
    outs, grads = [], []
    for flags in ({}, {fusion: False}):
        model.zero_grad()
        with train_fusions(**flags):
            out = model(x, level=2)
        (out * torch.linspace(-1, 1, out.shape[-1])).pow(2).sum().backward()
        outs.append(out.detach())
        grads.append(_grads(model))
    assert _rel(outs[0], outs[1]) < 1e-5
    assert any("stem" in n for n in grads[0]) and any("pos_embed" in n for n in grads[0])
    _assert_same_grads(grads[0], grads[1], tol=1e-5)


def test_shared_stem_step_equals_separate_passes():
    """A joint step with one stem pass for all levels accumulates the gradients that four full passes do."""
    model = _tiny()
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    tc = TrainConfig(levels=(1, 2, 4, 8))
    grads, losses = [], []
    for share in (True, False):
        model.zero_grad()
        losses.append(level_losses(model, x, y, tc, tc.levels, torch.autocast("cpu", enabled=False),
                                   share_stem=share))
        grads.append(_grads(model))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert any("stem" in n for n in grads[0])
    _assert_same_grads(grads[0], grads[1])


def test_sampled_schedule_is_an_unbiased_estimate_of_every_level_every_step():
    """Over one turn (D plus each narrower level once) the sampled schedule's gradients average to the `all`
    schedule's at the same weights; and each of its steps runs exactly two levels, D first."""
    model = _tiny()
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    ctx = torch.autocast("cpu", enabled=False)
    tc = TrainConfig(levels=(1, 2, 4, 8), label_smoothing=0.0)
    model.zero_grad()
    level_losses(model, x, y, tc, tc.levels, ctx)
    every = _grads(model)
    sampled = replace(tc, schedule="sampled")
    model.zero_grad()
    picked = []
    for step in range(3):
        levels, weights = step_levels(sampled, step)
        assert levels[0] == 1 and len(levels) == 2
        picked.append(levels[1])
        level_losses(model, x, y, sampled, levels, ctx, weights=weights)
    assert sorted(picked) == [2, 4, 8]
    _assert_same_grads({n: g / 3 for n, g in _grads(model).items()}, every)


def test_short_training_reaches_the_same_loss_with_and_without_fusions():
    """Ten optimizer steps of the joint schedule (AdamW, clipping) from the same start: the fused and the unfused
    training paths end at the same losses and weights."""
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    tc = TrainConfig(levels=(1, 2, 4, 8), lr=3e-3)
    finals = []
    for flags in ({}, {name: False for name in TrainFusions.names()}):
        model = _tiny(seed=1)
        opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr)
        with train_fusions(**flags):
            first = train_step(model, model, opt, x, y, tc, 0, torch.autocast("cpu", enabled=False),
                               share_stem=flags.get("shared_stem", True))[0]
            for step in range(1, 10):
                losses = train_step(model, model, opt, x, y, tc, step, torch.autocast("cpu", enabled=False),
                                    share_stem=flags.get("shared_stem", True))[0]
        finals.append((losses, torch.cat([p.detach().flatten() for p in model.parameters()])))
    assert losses[1] < first[1]  # it trains
    for lv in tc.levels:
        assert finals[0][0][lv] == pytest.approx(finals[1][0][lv], rel=1e-4)
    assert _rel(finals[0][1], finals[1][1]) < 1e-4


def test_unknown_fusion_and_schedule_are_refused():
    with pytest.raises(ValueError, match="unknown training fusion"):
        with train_fusions(convv=False):
            pass
    with pytest.raises(ValueError, match="--off: unknown fusion"):
        matsearch(["bench", "train", "--device", "cpu", "--tiny", "--off", "nope", "--debug"])


def test_bench_train_tiny_on_cpu(tmp_path, capsys):
    """`matsearch bench train --tiny` times every level, both joint steps, the forward and a ViT, and writes them."""
    assert matsearch(["bench", "train", "--device", "cpu", "--tiny", "--levels", "1,8", "--repeats", "1",
                      "--warmup", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "train_speed.json").read_text())
    rows = {r["row"]: r for r in data["rows"]}
    assert {"D", "D/8", "joint:all", "joint:sampled", "D forward only"} <= rows.keys()
    assert any(name.startswith("vit_") for name in rows)
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in rows.values())
    assert rows["joint:all"]["passes"] == 2 and "step_vs_D" in rows["joint:all"]
    assert data["environment"]["device_type"] == "cpu"
    assert "| joint:sampled |" in capsys.readouterr().out


def test_train_profile_script_tiny_on_cpu(tmp_path, capsys):
    """benchmarks/gpu/train_profile.py on CPU: the D step timed and profiled (top operators, groups, trace), the
    fusion, chunk-size and head-dim rows, the compact table; and a deadline that cuts the run still writes it."""
    from benchmarks.gpu import train_profile
    assert train_profile.main(["--device", "cpu", "--tiny", "--batch", "2", "--repeats", "1", "--budget", "600",
                               "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "train_profile.json").read_text())
    labels = [r["label"] for r in data["rows"]]
    assert labels == ["D", "reorder_gather off", "stem_channels_last off", "chunk 8", "chunk 16", "headdim 32"]
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in data["rows"])
    top = data["profile"]["top"]
    assert 0 < len(top) <= 20 and top[0]["ms"] >= top[-1]["ms"]
    assert sum(g["share"] for g in data["profile"]["groups"]) == pytest.approx(1.0)
    assert (tmp_path / "trace_d_step.json.gz").stat().st_size > 0
    out = capsys.readouterr().out
    assert "| chunk 16 |" in out and "| group (by kernel name) |" in out
    assert train_profile.main(["--device", "cpu", "--tiny", "--budget", "0.01", "--out", str(tmp_path / "cut")]) == 0
    cut = json.loads((tmp_path / "cut" / "train_profile.json").read_text())
    assert cut["cut"] and not cut["rows"]


def test_same_loss_script_tiny_on_cpu(tmp_path):
    """benchmarks/gpu/same_loss.py on CPU: the reference path, then the fused path for as many steps from the same
    start (on CPU both take the PyTorch path, so they agree); the table and every step's losses written."""
    from benchmarks.gpu import same_loss
    assert same_loss.main(["--device", "cpu", "--tiny", "--steps", "3", "--batch", "4", "--window", "2",
                           "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "same_loss.json").read_text())
    assert [len(c) for c in data["curves"].values()] == [3, 3] and data["steps_compared"] == 3
    assert data["weights_rel_diff"] < 1e-4 and set(data["levels"]) == {"1", "2", "4", "8"}
    assert "| D/8 |" in (tmp_path / "same_loss.md").read_text()


def test_same_loss_script_compares_schedules_on_cpu(tmp_path):
    """same_loss.py --compare schedules on CPU: `all` and `sampled` for as many steps from the same start, the narrower
    levels of `sampled` logged only on the steps that ran them, and each level's held-out top-1 for both."""
    from benchmarks.gpu import same_loss
    assert same_loss.main(["--device", "cpu", "--tiny", "--steps", "6", "--batch", "4", "--window", "2",
                           "--compare", "schedules", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "same_loss.json").read_text())
    curves = data["curves"]
    assert [len(c) for c in curves.values()] == [6, 6]
    assert all(set(c) == {"1", "2", "4", "8", "grad_norm"} for c in curves["all"])
    assert [sorted(k for k in c if k != "grad_norm") for c in curves["sampled"][:3]] == [["1", "2"], ["1", "4"],
                                                                                         ["1", "8"]]
    assert data["weights_rel_diff"] > 0  # different schedules, different weights
    for row in data["levels"].values():
        assert set(row["heldout_top1"]) == {"all", "sampled"}
        assert all(0 <= v <= 100 for v in row["heldout_top1"].values())
    assert "held-out top-1" in (tmp_path / "same_loss.md").read_text()
