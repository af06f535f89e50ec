"""The query path: what a cold `matsearch search` imports, and that the timm/torchvision-free pieces it uses (stem
layers, preprocessing) are the ones training and older index builds used."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_small_model
from index import build_index
from vision_model.config import get_config
from vision_model.preprocess import fitted_pixels, to_model_input

ROOT = Path(__file__).resolve().parents[1]
# packages a query never needs: each import costs about as much as the whole query
NOT_ON_THE_QUERY_PATH = ("timm", "torchvision", "torch._dynamo", "triton", "streamlit", "matplotlib", "pandas")


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory):
    """A small index of a few images, one a photo-sized JPEG (decoded at reduced size by the build)."""
    root = tmp_path_factory.mktemp("query-path")
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), np.ones((20, 20, 1), dtype=np.uint8))
    Image.fromarray(smooth).save(folder / "photo.jpg", quality=90)  # 800x600: draft-decoded at 1/8
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40 + i, 36, 3), dtype=np.uint8)).save(folder / f"noise{i}.png")
    model_dir = save_small_model(root / "model", seed=0, init_std=0.05)
    build_index(str(folder), root / "index", model_dir=model_dir, progress=False, workers=0, device="cpu")
    return folder, root / "index"


def test_cold_search_imports_no_timm_torchvision_dynamo_or_triton(photo_index):
    """`matsearch search` in a fresh CPU process (no Triton interpreter, as outside the tests) loads its model,
    searches and answers without importing any of NOT_ON_THE_QUERY_PATH; the indexed photo finds itself first."""
    folder, index_dir = photo_index
    script = ("import json, sys\n"
              "from app.cli import main\n"
              f"code = main(['search', {str(folder / 'photo.jpg')!r}, '--index', {str(index_dir)!r}, '--k', '2',"
              " '--json'])\n"
              f"bad = sorted(m for m in sys.modules if m in {NOT_ON_THE_QUERY_PATH!r}"
              f" or m.startswith(tuple(p + '.' for p in {NOT_ON_THE_QUERY_PATH!r})))\n"
              "print(json.dumps({'code': code, 'imported': bad}))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report == {"code": 0, "imported": []}
    result = json.loads("\n".join(lines[:-1]))["results"][0]
    assert result["metadata"][0]["key"].endswith("photo.jpg")
    assert result["scores"][0] == pytest.approx(1.0, abs=1e-6)


def test_stem_layers_match_timm_in_names_initialisation_and_outputs():
    """The conv stem and the patch embedding are torch layers now; under one seed they hold what timm's
    ConvNormAct / PatchEmbed held (so saved models load and training starts from the same weights) and compute the
    same outputs."""
    from timm.layers import ConvNormAct, PatchEmbed

    from vision_model.model import PatchEmbed as OurPatchEmbed
    from vision_model.model import conv_bn_gelu

    torch.manual_seed(0)
    theirs = torch.nn.Sequential(ConvNormAct(1, 8, 3, stride=2, act_layer=torch.nn.GELU),
                                 ConvNormAct(8, 16, 3, stride=2, act_layer=torch.nn.GELU))
    torch.manual_seed(0)
    ours = torch.nn.Sequential(conv_bn_gelu(1, 8), conv_bn_gelu(8, 16))
    assert list(theirs.state_dict()) == list(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), ours.state_dict().values()))
    x = torch.randn(2, 1, 28, 28)
    for mode in ("train", "eval"):
        getattr(theirs, mode)(), getattr(ours, mode)()
        assert torch.equal(theirs(x), ours(x))

    torch.manual_seed(1)
    theirs = PatchEmbed(32, 8, 3, 24, strict_img_size=False, bias=False)
    torch.manual_seed(1)
    ours = OurPatchEmbed(8, 3, 24, bias=False)
    assert list(theirs.state_dict()) == list(ours.state_dict())
    assert torch.equal(theirs.proj.weight, ours.proj.weight)
    x = torch.randn(2, 3, 24, 40)
    assert torch.equal(theirs(x), ours(x))


def _torchvision_fitted(config, img: Image.Image) -> torch.Tensor:
    """fitted_pixels as torchvision's v2 functional ops computed it (the preprocessing older indexes were built
    with)."""
    import torchvision.transforms.v2.functional as TF

    from vision_model.preprocess import model_pixels

    x = model_pixels(config, img)
    size, h, w = config.img_size, *x.shape[-2:]
    if config.crop == "center":
        return TF.center_crop(TF.resize(x, config.resize_size or size, antialias=True), [size, size])
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        x = TF.resize(x, [nh, nw], antialias=True)
    top, left = (size - nh) // 2, (size - nw) // 2
    frame = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], dim=-1).float().mean(-1)
    return TF.pad(x, [left, top, size - nw - left, size - nh - top], fill=frame.tolist())


def test_preprocessing_is_pixel_identical_to_torchvision():
    """Resize, centre crop or border-colour padding and normalisation, now in torch ops, give torchvision's pixels
    and values exactly: grey and colour, larger and smaller than the model, square and not, both crop modes."""
    import torchvision.transforms.v2.functional as TF

    rng = np.random.default_rng(0)
    configs = [get_config("matmamba_vision_fmnist"), get_config("matmamba_vision_35m"),
               get_config("matmamba_vision_35m", resize_size=None, img_size=96),
               get_config("matmamba_vision_clipart")]
    sizes = [(1, 1), (3, 500), (27, 28), (28, 28), (29, 61), (100, 37), (224, 224), (300, 256), (257, 640)]
    for config in configs:
        for i, (h, w) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            if i % 2:  # light border: a product photo on white (padding colour, inversion for dark-background models)
                arr[:2], arr[-2:], arr[:, :2], arr[:, -2:] = 250, 250, 250, 250
            for img in (Image.fromarray(arr), Image.fromarray(arr).convert("L")):
                expected = _torchvision_fitted(config, img)
                got = fitted_pixels(config, img)
                assert got.dtype == torch.uint8 and torch.equal(got, expected), (config.name, h, w, img.mode)
                reference = TF.normalize(TF.to_dtype(expected, torch.float32, scale=True), list(config.mean),
                                         list(config.std))
                assert torch.equal(to_model_input(config, img)[0], reference)
