"""Self-supervised training on a plain folder: the cache, the GPU augmentation, the objective and the folder eval."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import training.cache as cache_mod
from training.augment import ViewSpec, augment, jpeg_like
from training.ssl import SSLNet, make_views, ssl_losses
from training.train import TrainConfig, param_groups, train
from vision_model.config import get_config
from vision_model.hub import save_pretrained
from vision_model.model import MatMambaVision

ROOT = Path(__file__).resolve().parents[1]
TINY = {"img_size": 32, "d_model": 32, "depth": 2, "d_state": 8, "headdim": 4, "chunk_size": 16}


def drawing(i: int, topic: int, size: int = 64) -> Image.Image:
    """A clip-art-like RGBA picture: a coloured shape (one kind per topic) on a transparent background."""
    rng = np.random.default_rng(1000 * topic + i)
    img = Image.new("RGBA", (size + 8 * (i % 3), size), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    x0, y0 = rng.integers(2, size // 3, 2)
    x1, y1 = x0 + rng.integers(size // 3, size // 2), y0 + rng.integers(size // 3, size // 2)
    colour = tuple(int(c) for c in rng.integers(0, 120, 3)) + (255,)
    colour = (colour[0] + 130 * (topic == 0), colour[1], colour[2] + 130 * (topic == 1), 255)
    (d.ellipse if topic == 0 else d.rectangle)([x0, y0, x1, y1], fill=colour, outline=(0, 0, 0, 255), width=2)
    d.line([0, int(rng.integers(0, size)), size, int(rng.integers(0, size))], fill=(0, 0, 0, 255), width=1)
    return img


def make_folder(root: Path, per_topic: int = 12, bad: bool = True, duplicate: bool = True) -> Path:
    for topic, name in enumerate(("round", "square")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_topic):
            drawing(i, topic).save(root / name / f"{i:02d}.png")
    if bad:
        (root / "round" / "broken.png").write_bytes(b"not a png at all")
    if duplicate:  # the same picture filed under a second topic, as openclipart does
        (root / "square" / "zz_copy_of_round_00.png").write_bytes((root / "round" / "00.png").read_bytes())
    return root


def test_cache_resumes_after_a_kill_and_reports_bad_files_and_duplicates(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "imgs")
    whole = cache_mod.build_cache(folder, tmp_path / "whole", 32, workers=1, log=lambda m: None)
    assert len(whole) == 24 and list(whole.skipped) == ["round/broken.png"]
    assert whole.duplicates == {"square/zz_copy_of_round_00.png": "round/00.png"}

    real_work, calls = cache_mod._work, []

    def dying(args):
        calls.append(args)
        if len(calls) == 15:
            raise KeyboardInterrupt  # a kill in the middle of the build
        return real_work(args)
    monkeypatch.setattr(cache_mod, "SAVE_EVERY", 4)
    monkeypatch.setattr(cache_mod, "_work", dying)
    with pytest.raises(KeyboardInterrupt):
        cache_mod.build_cache(folder, tmp_path / "resumed", 32, workers=1, log=lambda m: None)
    assert not cache_mod.is_cache(tmp_path / "resumed")
    monkeypatch.setattr(cache_mod, "_work", real_work)
    messages = []
    resumed = cache_mod.build_cache(folder, tmp_path / "resumed", 32, workers=1, log=messages.append)
    assert any("resuming" in m for m in messages)
    assert resumed.keys == whole.keys and resumed.skipped == whole.skipped
    assert resumed.duplicates == whole.duplicates
    np.testing.assert_array_equal(np.asarray(resumed.images), np.asarray(whole.images))
    # alpha composited on white (not black): the corners of the drawings are white, bar a line's end
    assert np.median(np.asarray(whole.images)[:, :, 0, 0]) >= 250


def test_jpeg_like_matches_pillow_jpeg():
    img = drawing(3, 0, 64).convert("RGB").resize((64, 64))
    x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None].float() / 255
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=30)
    ref = torch.from_numpy(np.asarray(Image.open(buf))).permute(2, 0, 1)[None].float() / 255
    ours = jpeg_like(x, torch.tensor([30.0]))
    assert (ours - ref).abs().mean() < 0.35 * (x - ref).abs().mean()


def test_augment_is_a_function_of_the_seed_and_keeps_shapes():
    x = torch.from_numpy(np.stack([np.asarray(drawing(i, 1).convert("RGB").resize((32, 32))).transpose(2, 0, 1)
                                   for i in range(4)]))
    a = augment(x, ViewSpec(32), torch.Generator().manual_seed(1))
    b = augment(x, ViewSpec(32), torch.Generator().manual_seed(1))
    c = augment(x, ViewSpec(16, scale=(0.1, 0.3)), torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and a.shape == (4, 3, 32, 32) and c.shape == (4, 3, 16, 16)
    assert 0 <= a.min() and a.max() <= 1 and not torch.equal(a, augment(x, ViewSpec(32), torch.Generator()))


def _tiny_batch(n: int = 16) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(drawing(i, i % 2).convert("RGB").resize((32, 32))).transpose(2, 0, 1)
                                      for i in range(n)]))


def _train_steps(levels, steps: int, x: torch.Tensor):
    torch.manual_seed(0)
    config = get_config("matmamba_vision_clipart", **TINY)
    net = SSLNet(MatMambaVision(config, ssd_backend="torch"))
    opt = torch.optim.AdamW(param_groups(net, 0.05), lr=3e-3)
    history = []
    for step in range(steps):
        g, l = make_views(x, config, 1, torch.Generator().manual_seed(step))
        loss, losses = ssl_losses(net, g, l, levels, 0.2, torch.autocast("cpu", enabled=False))
        loss.backward()
        opt.step()
        opt.zero_grad()
        history.append(losses)
    return net.eval(), history


def test_ssl_loss_decreases_and_ties_the_narrow_levels_to_d():
    x = _tiny_batch()
    net, history = _train_steps((1, 2, 4, 8), 10, x)
    first = np.mean([h[1] for h in history[:3]])
    last = np.mean([h[1] for h in history[-3:]])
    assert last < first - 0.05, (first, last)
    assert np.mean([h[8] for h in history[-3:]]) < np.mean([h[8] for h in history[:3]])
    control, _ = _train_steps((1,), 10, x)  # the same steps at D alone: nothing ties D/8 to D

    def d8_finds_d(model):
        config = model.encoder.config
        pixels, _ = make_views(x, config, 0, torch.Generator().manual_seed(99))
        with torch.no_grad():
            d = torch.nn.functional.normalize(model.encoder.embed(pixels[:16], level=1), dim=-1)
            q = torch.nn.functional.normalize(model.encoder.embed(pixels[:16], level=8), dim=-1)
        return (q * d).sum(-1).mean().item()
    assert d8_finds_d(net) > d8_finds_d(control) + 0.05


def test_train_self_supervised_saves_resumes_after_a_kill_and_reports_bad_files(tmp_path, monkeypatch):
    import training.ssl as ssl_mod

    folder = make_folder(tmp_path / "imgs", per_topic=8)
    tc = dict(model="matmamba_vision_clipart", overrides=TINY, data=str(folder), objective="self-supervised",
              batch_size=8, epochs=2, local_crops=1, backend="torch", ckpt_every=1, workers=1)
    whole = train(TrainConfig(**tc, out=str(tmp_path / "whole")))
    assert whole["steps"] == 4 and whole["skipped_images"] == 1 and whole["duplicates_dropped"] == 1
    assert "round/broken.png" in json.loads((tmp_path / "whole" / "result.json").read_text())["skipped"]

    real, calls = ssl_mod.ssl_losses, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during step 3
        return real(*args, **kwargs)
    monkeypatch.setattr(ssl_mod, "ssl_losses", dying)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**tc, out=str(tmp_path / "killed")))
    monkeypatch.setattr(ssl_mod, "ssl_losses", real)
    resumed = train(TrainConfig(**tc, out=str(tmp_path / "killed")))  # from the step-2 checkpoint
    assert resumed["steps"] == 4
    from vision_model import load_model
    a, b = load_model(tmp_path / "whole" / "model"), load_model(tmp_path / "killed" / "model")
    assert a.config.num_classes == 0
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name)  # the resumed run is the uninterrupted one


def test_folder_eval_cli_on_a_made_up_folder_with_topics(tmp_path):
    folder = make_folder(tmp_path / "imgs", per_topic=10)
    torch.manual_seed(0)
    save_pretrained(MatMambaVision(get_config("matmamba_vision_clipart", **TINY)), tmp_path / "m")
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "app.cli", "eval", "--folder", str(folder), "--model", str(tmp_path / "m"),
           "--compare", "pixels", "--compare", "random", "--json", str(out / "e.json"), "--markdown",
           str(out / "e.md"), "--plot", str(out / "e.png"), "--copies", "8", "--query-fraction", "0.5"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    result = json.loads((out / "e.json").read_text())
    assert result["topics"] == ["round", "square"] and result["images"] == 20 and result["skipped"] == 1
    levels = [r["level"] for r in result["records"] if r["kind"] == "model"]
    assert levels == ["D", "D/2", "D/4", "D/8"]
    pixels = next(r for r in result["records"] if r["kind"] == "pixels")
    assert pixels["topic_top1"] >= 0.8  # the two topics differ in colour: raw pixels separate them
    assert pixels["copy_brightness"] > 0 and all(0 <= r["copy_flip"] <= 1 for r in result["records"])
    assert "| raw pixels | D |" in (out / "e.md").read_text() and (out / "e.png").stat().st_size > 1000
