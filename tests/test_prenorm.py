"""The pre-norm fused with in_proj (`vision_model.ops.prenorm`): output and gradients of the Triton forward and
backward, through the autograd Function and at explicit launches, against autograd through `norm_linear_ref` in
float64, in Triton's CPU interpreter (tests/conftest.py turns it on); and the switch back to mamba-ssm's kernel."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vision_model.ops.backends import TrainFusions, current_fusions, train_fusions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(lead, n, out, is_rms, dtype, layout="dense"):
    """x (lead + (n,)), the norm's weight and bias (None for RMSNorm), in_proj's weight (out, n), and an output
    gradient. layout "strided": x is a view with a dense last dim and a wider row stride (a slice of a wider tensor);
    "transposed": x's last dim is not dense."""
    x = torch.randn(*lead, n)
    if layout == "strided":
        x = torch.randn(*lead, n + 9)[..., 4:4 + n]
    elif layout == "transposed":
        x = torch.randn(n, *lead).movedim(0, -1)
    weight, bias = torch.rand(n) + 0.5, (None if is_rms else torch.randn(n) * 0.1)
    lin_weight = torch.randn(out, n) / n ** 0.5
    dout = torch.randn(*lead, out)
    cast = (lambda t: t.to(dtype) if t is not None else None)
    return cast(x), cast(weight), cast(bias), cast(lin_weight), cast(dout)


def _reference(x, weight, bias, lin_weight, dout, eps, is_rms):
    """Output and gradients (x, weight, bias, lin_weight) of `norm_linear_ref` in float64."""
    from vision_model.ops.prenorm import norm_linear_ref
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias, lin_weight)]
    out = norm_linear_ref(*leaves, eps, is_rms)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dout.double())
    return out, grads


# (norm, leading shape, width, dtype, layout, rows a forward program, rows a backward program, rows a step): rows
# not a multiple of any tile, a width not a power of two, the block's 384, bf16 inputs, strided and transposed x
CASES = [("rms", (2, 37), 64, torch.float32, "dense", 4, 8, 2),
         ("layer", (3, 19), 64, torch.float32, "strided", 1, 16, 16),
         ("rms", (2, 29), 96, torch.float32, "strided", 2, 4, 4),
         ("layer", (5, 13), 96, torch.float32, "transposed", 8, 32, 8),
         ("rms", (45,), 384, torch.float32, "dense", 4, 8, 4),
         ("layer", (2, 21), 384, torch.float32, "dense", 2, 16, 2),
         ("rms", (3, 11), 96, torch.bfloat16, "dense", 4, 8, 2),
         ("layer", (2, 17), 384, torch.bfloat16, "strided", 4, 8, 4)]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}-{str(c[3])[6:]}-{c[4]}" for c in CASES])
def test_norm_linear_equals_reference_output_and_gradients(case):
    """The output and the gradients of x, the norm's weight and bias and in_proj's weight, through the autograd
    Function (its default launches) and through the two kernels at explicit tilings, against float64 autograd."""
    pytest.importorskip("triton")
    from vision_model.ops.prenorm import norm_bwd_triton, norm_fwd_triton, norm_linear_triton
    kind, lead, n, dtype, layout, fwd_rows, bwd_rows, step = case
    is_rms, eps = kind == "rms", 1e-5
    torch.manual_seed(0)
    x, weight, bias, lin_weight, dout = _inputs(lead, n, 48, is_rms, dtype, layout)
    out_ref, ref = _reference(x, weight, bias, lin_weight, dout, eps, is_rms)
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # bf16: about its rounding, 2^-8

    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias, lin_weight)]
    out = norm_linear_triton(leaves[0], leaves[1], leaves[2], leaves[3], eps, is_rms)
    got = torch.autograd.grad(out, [t for t in leaves if t is not None], dout)
    assert out.shape == out_ref.shape and out.dtype == dtype
    assert all(g.shape == r.shape and g.dtype == dtype for g, r in zip(got, ref))
    errors = [_rel(out, out_ref)] + [_rel(g, r) for g, r in zip(got, ref)]
    assert max(errors) < tol, errors

    # the kernels at explicit tilings: the normalised rows against F.linear's input, the norm's gradients against
    # the reference's (the gradient of the normalised rows is dout @ lin_weight)
    normed, mean, rstd = norm_fwd_triton(x, weight, bias, eps, is_rms, rows_per_program=fwd_rows)
    normed_ref = (F.rms_norm(x.double(), (n,), weight.double(), eps) if is_rms
                  else F.layer_norm(x.double(), (n,), weight.double(), bias.double(), eps))
    assert normed.shape == x.shape and normed.dtype == dtype and (mean is None) == is_rms
    d_normed = dout.double() @ lin_weight.double()
    dx, dweight, dbias = norm_bwd_triton(x, d_normed.to(dtype), weight, mean, rstd, has_bias=not is_rms,
                                         rows_per_program=bwd_rows, rows_per_step=step)
    assert dx.shape == x.shape and dx.dtype == dtype and (dbias is None) == is_rms
    direct = [dx, dweight] + ([] if is_rms else [dbias])
    errors = [_rel(normed, normed_ref)] + [_rel(g, r) for g, r in zip(direct, ref)]
    assert max(errors) < tol, errors


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norm_linear_under_autocast_runs_the_matmuls_in_the_autocast_dtype(kind):
    """fp32 inputs under (CPU) autocast: the output is bf16, as autocast's F.linear gives, and the gradients have
    the inputs' fp32, all close to float64 autograd."""
    pytest.importorskip("triton")
    from vision_model.ops.prenorm import norm_linear_ref, norm_linear_triton
    is_rms = kind == "rms"
    torch.manual_seed(0)
    x, weight, bias, lin_weight, dout = _inputs((2, 23), 96, 40, is_rms, torch.float32)
    out_ref, ref = _reference(x, weight, bias, lin_weight, dout, 1e-6, is_rms)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias, lin_weight)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm_linear_triton(*leaves, 1e-6, is_rms)
        expected_dtype = norm_linear_ref(x, weight, bias, lin_weight, 1e-6, is_rms).dtype
    assert out.dtype == expected_dtype == torch.bfloat16
    got = torch.autograd.grad(out, [t for t in leaves if t is not None], dout.to(out.dtype))
    assert all(g.dtype == torch.float32 for g in got)
    errors = [_rel(out, out_ref)] + [_rel(g, r) for g, r in zip(got, ref)]
    assert max(errors) < 1e-2, errors


@pytest.mark.parametrize("norm", [torch.nn.RMSNorm(64), torch.nn.RMSNorm(64, eps=1e-3), torch.nn.LayerNorm(64)],
                         ids=["rms-default-eps", "rms-eps", "layer"])
def test_norm_linear_equals_the_norm_modules(norm):
    """Given an nn.RMSNorm's or nn.LayerNorm's own parameters and eps (nn.RMSNorm's default eps is None, meaning
    the dtype's machine epsilon), the result is F.linear(norm(x), W)."""
    pytest.importorskip("triton")
    from vision_model.ops.prenorm import norm_linear_triton
    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, lin_weight = torch.randn(3, 10, 64) * 1e-3, torch.randn(32, 64)  # small rows: eps matters
    out = norm_linear_triton(x, norm.weight, getattr(norm, "bias", None), lin_weight, norm.eps,
                             isinstance(norm, torch.nn.RMSNorm))
    assert _rel(out, F.linear(norm(x), lin_weight)) < 1e-5


def test_own_prenorm_is_a_training_fusion_that_can_be_turned_off():
    """On by default; `train_fusions(own_prenorm=False)` selects mamba-ssm's kernel (CUDA only) and leaves the
    norm_linear fusion itself on."""
    assert "own_prenorm" in TrainFusions.names() and TrainFusions().own_prenorm
    with train_fusions(own_prenorm=False) as fusions:
        assert not fusions.own_prenorm and fusions.norm_linear
        assert current_fusions() == fusions
    assert current_fusions().own_prenorm
