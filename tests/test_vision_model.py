"""MatMamba-Vision encoder: SSD correctness, nesting semantics, checkpoints, cost model, preprocessing."""
from __future__ import annotations

import copy
import os
import threading

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import vision_model
from conftest import needs_fashion_mnist
from vision_model import create_model, get_config, submodel_cost
from vision_model.block import MatMamba2
from vision_model.device import resolve_device
from vision_model.fileio import atomic_write
from vision_model.datasets import load_fashion_mnist
from vision_model.preprocess import to_model_input
from vision_model.ops.ssd_minimal import ssd_chunked, ssd_recurrent
from vision_model.views import VIEW_SETS, black, view, views_of

# a small config that still has every moving part: several heads per level, more than one chunk
SMALL = dict(d_model=64, depth=3, d_state=16, headdim=8, chunk_size=8, img_size=16, patch_size=4,
             drop_path_rate=0.0, stem="patch")


def small_model(**kw) -> vision_model.MatMambaVision:
    torch.manual_seed(0)
    return create_model("matmamba_vision_fmnist", **{**SMALL, **kw}).eval()


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- SSD --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_chunked_ssd_equals_step_by_step_recurrence_float64(seed, chunk):
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 3, (1,), generator=g))
    l = int(torch.randint(1, 70, (1,), generator=g))  # mostly not a multiple of the chunk
    groups = int(torch.randint(1, 3, (1,), generator=g))
    h = groups * int(torch.randint(1, 4, (1,), generator=g))
    p, n = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 17, (1,), generator=g))
    f64 = dict(dtype=torch.float64, generator=g)
    x, B, C = torch.randn(b, l, h, p, **f64), torch.randn(b, l, groups, n, **f64), torch.randn(b, l, groups, n, **f64)
    dt = torch.rand(b, l, h, **f64) * 0.7
    A, D = -torch.rand(h, **f64) * 3, torch.randn(h, **f64)
    ref = ssd_recurrent(x, dt, A, B, C, D)
    out = ssd_chunked(x, dt, A, B, C, D, chunk_size=chunk)
    assert out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-12


def test_chunked_ssd_gradients_equal_recurrence_float64():
    g = torch.Generator().manual_seed(7)
    shapes = [(2, 19, 4, 3), (2, 19, 4), (4,), (2, 19, 1, 5), (2, 19, 1, 5), (4,)]
    inputs = [torch.randn(*s, dtype=torch.float64, generator=g) for s in shapes]
    inputs[1] = inputs[1].abs() * 0.5  # dt > 0
    inputs[2] = -inputs[2].abs()  # A < 0
    grads = []
    for fn in (lambda *a: ssd_recurrent(*a), lambda *a: ssd_chunked(*a, chunk_size=6)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        fn(*leaves).pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for g_ref, g_chk in zip(*grads):
        assert rel_err(g_chk, g_ref) < 1e-10


# -- the inference fast paths (the kernels themselves: tests/test_kernels.py) -------------------------------------

def test_residual_fused_block_loop_equals_plain_blocks():
    """Inference builds the tokens in one GEMM + add and runs the blocks with the residual add inside out_proj's
    GEMM; training with drop-path builds them by concatenation and runs plain blocks. Same numbers either way, up to
    fp32 rounding (the adds happen in another order)."""
    model = small_model(drop_path_rate=0.1)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        fused = model.embed(x, widths=[64, 8, 24], backend="torch")  # eval: fused loop
        tokens = model._patch_tokens(x) + model.pos_embed
        tokens = torch.cat([tokens, model.cls_token.expand(3, -1, -1)], dim=1)
        for blk, w in zip(model.blocks, [64, 8, 24]):
            tokens = blk(tokens, model.config.inner_of(w), "torch")  # eval: drop-path is the identity
        plain = model.norm(tokens[:, -1])
    assert rel_err(fused, plain) < 1e-6


def test_inference_under_autocast_keeps_the_plain_blocks_numbers():
    """Under autocast (the trainer's in-training evaluation on GPU runs in bf16 autocast) the inference block loop
    cannot add into the fp32 stream inside a bf16 GEMM; it must give the plain blocks' result at every width, and
    the stream stays fp32 as with the conv stem."""
    model = small_model()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model.embed(x, widths=[64, 8, 24], backend="torch")
        tokens = model._tokens(x)
        assert tokens.dtype == torch.float32
        for blk, w in zip(model.blocks, [64, 8, 24]):
            tokens = blk(tokens, model.config.inner_of(w), "torch")
        plain = model.norm(tokens[:, -1])
    assert fused.dtype == plain.dtype and torch.equal(fused, plain)
    with torch.no_grad():
        assert rel_err(fused.float(), model.embed(x, widths=[64, 8, 24], backend="torch")) < 0.05


def test_pre_norm_folded_into_in_proj_equals_norm_then_block():
    """At inference on the triton backend each block's pre-norm is folded into in_proj (W·diag(w), the rows' rstd
    applied to the conv input, dt and the gate); the same algebra on the PyTorch backend equals norm-then-block at
    every width, the folded weights are cached and follow an update of the norm's weight."""
    model = small_model()
    blk = model.blocks[0]
    x = torch.randn(2, 17, model.config.d_model) * 3
    with torch.no_grad():
        blk.norm.weight.copy_(torch.rand_like(blk.norm.weight) + 0.5)
        for inner in (8, 24, 64):
            plain = blk.forward_fused(x.clone(), inner, "torch", fold_norm=False)
            assert rel_err(blk.forward_fused(x.clone(), inner, "torch", fold_norm=True), plain) < 1e-6
        blk.norm.weight.mul_(2.0)  # the cache sees the norm's version change
        plain = blk.forward_fused(x.clone(), 24, "torch", fold_norm=False)
        assert rel_err(blk.forward_fused(x.clone(), 24, "torch", fold_norm=True), plain) < 1e-6
    # with autograd the fold runs uncached and out of place, and gradients reach the norm's weight
    folded = blk.forward_fused(x, 24, "torch", fold_norm=True)
    assert rel_err(folded.detach(), plain) < 1e-6
    folded.sum().backward()
    assert blk.norm.weight.grad is not None and blk.norm.weight.grad.abs().sum() > 0


def test_inference_token_table_follows_parameter_updates():
    """The cached positional embedding + CLS table is rebuilt when a parameter changes, and the tokens equal the
    patch embedding plus positional embedding with the CLS token appended, at the trained grid and another one."""
    model = small_model()
    for size in ((16, 16), (16, 20)):
        x = torch.randn(2, 1, *size)
        grid = (size[0] // 4, size[1] // 4)
        with torch.no_grad():
            for _ in range(2):
                want = torch.cat([model._patch_tokens(x) + model._pos_embed(grid),
                                  model.cls_token.expand(2, -1, -1)], dim=1)
                assert torch.allclose(model._tokens(x), want, atol=1e-6)
                model.cls_token.add_(1.0)
                model.pos_embed.mul_(2.0)


@pytest.mark.parametrize("orders", [("col",), ("row", "row_rev", "col_rev")])
def test_scan_orders_reorder_the_patches_per_block(orders):
    """Each block scans the patch grid in its own order (cycled over the layers), the CLS token last: the same
    numbers as gathering the tokens by hand, in the fused loop and the one-by-one (training) loop alike."""
    model = small_model(scan_orders=orders, drop_path_rate=0.1)
    x = torch.randn(2, 1, 16, 20)  # a 4 x 5 patch grid: rows and columns differ
    grid = torch.arange(20).reshape(4, 5)
    order_of = {"row": grid.flatten(), "row_rev": grid.flatten().flip(0), "col": grid.t().flatten(),
                "col_rev": grid.t().flatten().flip(0)}
    widths = [64, 8, 24]
    with torch.no_grad():
        fused = model.embed(x, widths=widths, backend="torch")
        patches = model._patch_tokens(x) + model._pos_embed((4, 5))
        for i, (blk, w) in enumerate(zip(model.blocks, widths)):
            if i:  # back to row-major, so each block's own order is a plain gather
                restored = torch.empty_like(patches)
                restored[:, order] = patches
                patches = restored
            order = order_of[orders[i % len(orders)]]
            tokens = torch.cat([patches[:, order], cls if i else model.cls_token.expand(2, -1, -1)], dim=1)
            tokens = blk(tokens, model.config.inner_of(w), "torch")
            patches, cls = tokens[:, :-1], tokens[:, -1:]
        by_hand = model.norm(cls[:, 0])
        model.train()
        torch.manual_seed(1)
        model.blocks.apply(lambda m: setattr(m, "drop_prob", 0.0) if hasattr(m, "drop_prob") else None)
        one_by_one = model.embed(x, widths=widths, backend="torch")
    assert torch.allclose(fused, by_hand, atol=1e-5, rtol=1e-5)
    assert torch.allclose(one_by_one, by_hand, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fused, small_model().embed(x, widths=widths, backend="torch"), atol=1e-3)


def test_scan_orders_are_checked():
    with pytest.raises(ValueError, match="scan_orders"):
        small_model(scan_orders=("diagonal",))


# -- nesting ----------------------------------------------------------------------------------------------------

def standalone_from_slices(model, widths):
    """A plain (non-nested) model whose blocks have exactly the inner sizes `widths` give, loaded with the slices."""
    cfg = model.config
    plain = create_model("matmamba_vision_fmnist", **SMALL).eval()
    for i, w in enumerate(widths):
        plain.blocks[i].mixer = MatMamba2(cfg.d_model, cfg.inner_of(w), cfg.d_state, cfg.d_conv, cfg.headdim,
                                          cfg.chunk_size)
    missing, unexpected = plain.load_state_dict(model.submodel_state_dict(widths=widths), strict=True)
    assert not missing and not unexpected
    return plain.double().eval()


def plain_forward(plain, x):
    """Every block at its own full size: no nesting involved."""
    return plain.head(plain._embed_inners(x, [None] * plain.config.depth, "torch"))


@pytest.mark.parametrize("widths", [[64] * 3, [32] * 3, [16] * 3, [8] * 3, [64, 8, 24]])
def test_nested_submodel_equals_standalone_model_from_sliced_weights(widths):
    model = small_model().double()
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    plain = standalone_from_slices(model, widths)
    out = model(x, widths=widths, backend="torch")
    ref = plain_forward(plain, x)
    assert rel_err(out, ref) < 1e-12
    # gradients: the nested model's gradient, sliced, is the standalone model's gradient
    model.train(), plain.train()
    model(x, widths=widths, backend="torch").square().sum().backward()
    plain_forward(plain, x).square().sum().backward()
    plain_grads = dict(plain.named_parameters())
    for i, w in enumerate(widths):
        mixer = model.blocks[i].mixer
        inner = model.config.inner_of(w)
        grads_as_weights = copy.deepcopy(mixer)  # slice the gradients exactly as the weights are sliced
        for g_param, param in zip(grads_as_weights.parameters(), mixer.parameters()):
            g_param.data = param.grad.clone()
        with torch.no_grad():
            for name, g in grads_as_weights.nested_weights(inner).items():
                assert rel_err(g, plain_grads[f"blocks.{i}.mixer.{name}"].grad) < 1e-12, (i, name)
        # heads the submodel does not use get no gradient
        assert torch.count_nonzero(mixer.dt_bias.grad[inner // mixer.headdim:]) == 0


@needs_fashion_mnist
def test_all_widths_write_into_the_same_embedding_space(one_torch_thread):
    """On the shipped model, an image embedded by a nested submodel (D/2, D/4, D/8) finds that same image's full
    model (D) embedding among a few hundred others, and its nearest other image at D mostly has its label: the
    levels share one space, so a database indexed at D serves queries at any level. The control, the same narrow
    embeddings in a randomly rotated space, finds neither."""
    model = vision_model.load_model().eval()
    images, labels = load_fashion_mnist("test")
    n = 128
    x, y = to_model_input(model.config, images[:n]), labels[:n]

    def embed(level):
        with torch.no_grad():
            return F.normalize(torch.cat([model.embed(batch, level=level) for batch in x.split(64)]), dim=1)

    full = embed(1)
    narrow = {level: embed(level) for level in model.config.levels if level != 1}
    rotation = torch.linalg.qr(torch.randn(model.config.d_model, model.config.d_model,
                                           generator=torch.Generator().manual_seed(0)))[0]

    def against_full(queries):
        scores = queries @ full.T
        finds_itself = (scores.argmax(1) == torch.arange(n)).float().mean().item()  # chance 1/n
        scores.fill_diagonal_(-2)  # the nearest other image
        label_match = (y[scores.argmax(1)] == y).float().mean().item()  # chance ~1/10
        return finds_itself, label_match

    for level, queries in narrow.items():
        finds_itself, label_match = against_full(queries)
        assert finds_itself > 0.4 and label_match > 0.8, (level, finds_itself, label_match)
        finds_itself, label_match = against_full(queries @ rotation)
        assert finds_itself < 0.05 and label_match < 0.3, (level, finds_itself, label_match)


def test_level_and_widths_validation():
    model = small_model()
    x = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match="level must be one of"):
        model(x, level=3)
    with pytest.raises(ValueError, match="one width per layer"):
        model(x, widths=[64, 64])
    with pytest.raises(ValueError, match="not a valid nested width"):
        model(x, widths=[64, 64, 3])
    with pytest.raises(ValueError, match="either level or widths"):
        model(x, level=2, widths=[64] * 3)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 1, 15, 16))


def test_two_granularities_from_two_threads_do_not_interfere():
    model = small_model()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        expected = {lv: model(x, level=lv) for lv in (1, 8)}
    results, errors = {}, []

    def worker(level):
        try:
            with torch.no_grad():
                for _ in range(5):
                    out = model(x, level=level)
                    assert torch.allclose(out, expected[level], atol=1e-5)
            results[level] = out
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(lv,)) for lv in (1, 8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and set(results) == {1, 8}


def test_inference_cache_sees_fused_optimizer_steps_between_train_and_eval():
    model = small_model()
    x = torch.randn(4, 1, 16, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)  # fused steps do not bump _version
    for _ in range(2):
        model.train()
        model(x, level=8).square().mean().backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        with torch.no_grad():
            cached = model(x, level=8)
        with torch.enable_grad():
            fresh = model(x, level=8).detach()
        assert torch.allclose(cached, fresh, atol=1e-6)


def test_inference_pads_in_proj_rows_to_a_multiple_of_64_without_changing_outputs():
    model = small_model()
    x = torch.randn(2, 1, 16, 16)
    widths = [8, 16, 64]  # in_proj rows 2*16+32+2 = 66, 2*32+32+4 = 100, 2*128+32+16 = 304
    with torch.no_grad():
        cached = model.embed(x, widths=widths)
        rows = [blk.mixer._weights_for(model.config.inner_of(w))["in_proj.weight"].shape[0]
                for blk, w in zip(model.blocks, widths)]
    assert rows == [128, 128, 320]
    assert torch.allclose(model.embed(x, widths=widths), cached, atol=1e-6)  # grad mode: the unpadded slices


def test_inference_weight_cache_follows_parameter_updates():
    model = small_model()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        before = model(x, level=2)
        model.blocks[0].mixer.in_proj.weight.mul_(1.5)  # in place, as an optimizer step would
        after = model(x, level=2)
    assert not torch.allclose(before, after)
    with torch.enable_grad():
        fresh = model(x, level=2).detach()
    assert torch.allclose(after, fresh, atol=1e-6)


# -- checkpoints, timm, resolution --------------------------------------------------------------------------------

def test_atomic_write_replaces_whole_files_or_leaves_the_old_one(tmp_path):
    """Bytes or a writer function; a writer that fails half-way leaves the previous file and no temporary file."""
    path = tmp_path / "doc.json"
    atomic_write(path, b"first")
    atomic_write(path, lambda f: np.save(f, np.arange(3)))
    assert np.load(path).tolist() == [0, 1, 2]

    def half_then_fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, half_then_fail)
    assert np.load(path).tolist() == [0, 1, 2] and [p.name for p in tmp_path.iterdir()] == ["doc.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by others where the umask allows it


def test_device_names_resolve():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(RuntimeError):
        resolve_device("gpu")


def test_save_load_round_trip(tmp_path):
    model = small_model()
    vision_model.save_pretrained(model, tmp_path / "m", dtype=None, extra={"note": "test"})
    loaded = vision_model.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and loaded.meta == {"note": "test"}
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        for lv in (1, 8):
            assert torch.equal(loaded(x, level=lv), model(x, level=lv))
    assert len(vision_model.weights_hash(tmp_path / "m")) == 64
    assert not list((tmp_path / "m").glob(".*")), "no temporary files left behind"


def test_bf16_checkpoint_stays_close(tmp_path):
    model = small_model()
    vision_model.save_pretrained(model, tmp_path / "m")  # bf16 by default: what ships in the repo
    loaded = vision_model.from_pretrained(tmp_path / "m")
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert rel_err(loaded.embed(x), model.embed(x)) < 2e-2


def test_load_model_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved MatMamba-Vision model folder"):
        vision_model.load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"config": {"d_model": 64, "bogus": 1}}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown config keys"):
        vision_model.load_model(tmp_path)


def test_timm_registry_creates_every_config():
    for name in vision_model.CONFIGS:
        assert name in timm.list_models("matmamba_vision*")
    model = timm.create_model("matmamba_vision_fmnist", depth=2, num_classes=3)
    assert model.config.depth == 2 and model.head.out_features == 3


def test_patch_tokens_as_a_gemm_equal_timm_patch_embed_conv():
    model = create_model("matmamba_vision_35m", depth=1, patch_size=8, img_size=32).eval()
    x = torch.randn(2, 3, 24, 40)  # not square, not the trained size
    with torch.no_grad():
        assert torch.allclose(model._patch_tokens(x), model.patch_embed(x), atol=1e-5, rtol=1e-5)


def test_position_embedding_interpolates_to_other_resolutions():
    model = small_model()
    with torch.no_grad():
        for size in (8, 24, 32):
            out = model.embed(torch.randn(2, 1, size, size), level=4)
            assert out.shape == (2, 64) and torch.isfinite(out).all()
        wide = model.embed(torch.randn(1, 1, 16, 32))
    assert wide.shape == (1, 64)


# -- cost model -------------------------------------------------------------------------------------------------

def test_cost_model_matches_paper_parameter_counts():
    cfg = get_config("matmamba_vision_35m")
    params = [submodel_cost(cfg, level=lv).params / 1e6 for lv in (1, 2, 4, 8)]
    assert params == pytest.approx([35.9, 19.8, 11.7, 7.7], abs=0.05)


@pytest.mark.parametrize("widths", [None, [32, 32, 32], [8, 8, 8], [64, 16, 40]])
def test_cost_model_params_equal_numel_of_touched_weights(widths):
    model = small_model()
    widths = widths or [64] * 3
    touched = sum(t.numel() for t in model.submodel_state_dict(widths=widths).values())
    assert submodel_cost(model.config, widths=widths).params == touched


def test_cosine_head_depends_on_the_embedding_direction_only(tmp_path):
    model = small_model(head="cosine")
    emb = torch.randn(4, 64)
    with torch.no_grad():
        logits = model.head(emb)
        assert torch.allclose(model.head(3.7 * emb), logits, atol=1e-5)
        assert logits.abs().max() <= model.config.head_scale + 1e-4
        assert logits.argmax(-1).tolist() == (F.normalize(emb, dim=-1) @ F.normalize(model.head.weight, dim=-1).T
                                             ).argmax(-1).tolist()
    touched = sum(t.numel() for t in model.submodel_state_dict(level=2).values())
    assert submodel_cost(model.config, level=2).params == touched  # no bias
    vision_model.save_pretrained(model, tmp_path, dtype=None)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(vision_model.load_model(tmp_path)(x), model(x))
    with pytest.raises(ValueError, match="head must be"):
        get_config("matmamba_vision_fmnist", head="arcface")


def test_conv_stem_tokens_cost_and_round_trip(tmp_path):
    """The conv stem (3x3 stride-2 convs, BatchNorm, GELU, 1x1 projection): the same token grid as the patch stem,
    parameters and FLOPs as the cost model says (FLOPs counted by torch's FlopCounterMode), every granularity
    embeds, BatchNorm statistics survive a save/load, and a non-power-of-2 patch is refused."""
    from torch.utils.flop_counter import FlopCounterMode
    from vision_model.cost import stem_cost
    model = small_model(stem="conv")
    assert model.config.stem_channels == (16, 32) and not hasattr(model, "patch_embed")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert model._patch_tokens(x).shape == (2, 16, 64)
        with FlopCounterMode(display=False) as counter:
            model.stem(x[:1])
    cost = stem_cost(model.config, 16)
    assert cost.params == sum(p.numel() for p in model.stem.parameters())
    assert cost.flops == counter.get_total_flops()
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 1, 16, 16))  # moves the BatchNorm running statistics off their initial values
    model.eval()
    embs = {lv: model.embed(x, level=lv) for lv in model.config.levels}
    assert all(e.shape == (2, 64) and torch.isfinite(e).all() for e in embs.values())
    vision_model.save_pretrained(model, tmp_path, dtype=None)
    loaded = vision_model.load_model(tmp_path)
    assert loaded.config.stem == "conv"
    assert torch.allclose(loaded.embed(x, level=2), embs[2], atol=1e-6)
    assert loaded.embed(torch.randn(1, 1, 24, 24)).shape == (1, 64)  # other resolutions: interpolated positions
    with pytest.raises(ValueError, match="power of 2"):
        get_config("matmamba_vision_fmnist", stem="conv", patch_size=7)


def test_cost_model_flops_scale_with_width_and_resolution():
    cfg = get_config("matmamba_vision_35m")
    flops = [submodel_cost(cfg, level=lv).flops for lv in (1, 2, 4, 8)]
    assert flops == sorted(flops, reverse=True)
    assert 17e9 < flops[0] < 19e9  # ~2 x 8.9 GMACs per 224px image at full width
    assert submodel_cost(cfg, img_size=448).flops > 4 * flops[0]  # 4x the tokens, plus longer scans


# -- preprocessing ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "I;16", "I", "F", "LA", "1"])
def test_preprocess_accepts_any_mode_and_size(mode):
    model = small_model()
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (37, 23, 3), dtype=np.uint8), "RGB")
    img = img.convert(mode) if mode not in ("I;16",) else Image.fromarray(
        rng.integers(0, 65535, (37, 23), dtype=np.uint16))
    x = model.preprocess([img, img.copy()])
    assert x.shape == (2, 1, 16, 16) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_preprocess_inverts_light_backgrounds_for_dark_background_models():
    model = small_model()
    dark = Image.new("L", (16, 16), 0)
    dark.paste(200, (4, 4, 12, 12))
    light = Image.eval(dark, lambda v: 255 - v)
    assert torch.allclose(model.preprocess(dark), model.preprocess(light), atol=1e-6)


def test_preprocess_rgb_center_crop():
    model = create_model("matmamba_vision_35m", depth=1)
    x = model.preprocess(Image.new("RGB", (640, 480), (255, 0, 0)))
    assert x.shape == (1, 3, 224, 224)
    assert x[0, 0].mean() > 2 and x[0, 1].mean() < -1  # red survives normalisation


# -- multi-view embeddings ------------------------------------------------------------------------------------------
def test_views_move_content_and_mirror():
    dot = torch.zeros(1, 1, 5, 5, dtype=torch.uint8)
    dot[..., 2, 1] = 255
    assert view(dot, 1, 0, False)[0, 0, 3, 1] == 255  # down one row
    assert view(dot, 0, -1, False)[0, 0, 2, 0] == 255  # left one column
    assert view(dot, 0, 2, True)[0, 0, 2, 1] == 255  # right to column 3, then mirrored to column 1
    assert view(dot, 0, -2, False).sum() == 0  # pushed out: the border that comes in is black
    assert [len(VIEW_SETS[s]) for s in ("1", "flip", "shift1", "shift2")] == [1, 2, 10, 18]
    config = get_config("matmamba_vision_fmnist")  # model input: the border comes in as black
    white = to_model_input(config, torch.full((1, 1, 28, 28), 255, dtype=torch.uint8))
    moved = view(white, 0, 2, False, background=black(config))
    assert torch.allclose(moved[..., :2], black(config)) and torch.allclose(moved[..., 2:], white[..., :26])
    assert len(set(VIEW_SETS["shift2"])) == 18
    with pytest.raises(ValueError, match="unknown view set 'mirror'; choose from 1, flip, shift1, shift2"):
        views_of("mirror")

