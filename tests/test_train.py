"""`matsearch train`: ImageFolder training (labels, held-out split, augmentation, unreadable files, resume) and the
Fashion-MNIST fast path's resume. Tiny models on the CPU."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vision_model
import training.train as train_module
from app.cli import main as cli
from training.data import ImageFolderDataset, collate_skipping, holdout_split, read_image, scan_imagefolder
from vision_model.datasets import fashion_mnist_dir
from vision_model.images import decode_image
from vision_model.preprocess import to_model_input

TINY = ["--set", "depth=2", "--set", "d_model=32", "--set", "d_state=8", "--set", "headdim=8"]
TINY_16 = TINY + ["--set", "img_size=16", "--set", "patch_size=4"]
CLASSES = ["cat", "dog", "emu"]  # the folders; "dog" also holds the corrupt file
CORRUPT = "dog/05_truncated.jpg"


def _image(rng: np.random.Generator, cls: int, i: int) -> tuple[Image.Image, str]:
    """A small image of a class-tinted random texture, in one of several sizes, modes and formats."""
    w, h = int(rng.integers(10, 40)), int(rng.integers(10, 40))
    arr = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
    arr[..., cls] = 200 + rng.integers(0, 55, (h, w), dtype=np.uint8)
    rgb = Image.fromarray(arr)
    kind = i % 6
    if kind == 0:
        return rgb, "jpg"
    if kind == 1:
        return rgb.convert("L"), "png"
    if kind == 2:
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)))
        return rgba, "png"
    if kind == 3:
        return rgb.convert("P"), "png"
    if kind == 4:
        return Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 250), "png"  # I;16
    return rgb.convert("L"), "jpeg"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """3 classes x 12 images of different sizes and modes, plus one truncated JPEG in 'dog'."""
    root = tmp_path_factory.mktemp("tree") / "images"
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(12):
            img, ext = _image(rng, c, i)
            img.save(root / name / f"{i:02d}.{ext}")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / CORRUPT).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return root


def _train(out, *extra) -> int:
    return cli(["train", "--out", str(out), "--backend", "torch", "--seed", "3", *extra])


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"resumed run differs from the uninterrupted one in {different}"


class _Killed(Exception):
    pass


def _kill_at(monkeypatch, step: int):
    """Make the next run die when it is about to take optimisation step `step` (0-based)."""
    real = train_module.lr_at

    def lr_at(s, *args):
        if s == step:
            raise _Killed(f"killed before step {s}")
        return real(s, *args)

    monkeypatch.setattr(train_module, "lr_at", lr_at)


def _resume_after_kill_matches_whole(tmp_path, monkeypatch, args, kill_at: int = 5):
    """Train tmp_path/resumed with `args`, killed before step `kill_at` and rerun: its weights must equal those of
    the uninterrupted run in tmp_path/whole. Undoes every monkeypatch."""
    _kill_at(monkeypatch, kill_at)
    with pytest.raises(_Killed):
        _train(tmp_path / "resumed", *args)
    monkeypatch.undo()
    assert _train(tmp_path / "resumed", *args) == 0
    _assert_same_weights(tmp_path / "whole", tmp_path / "resumed")


# -- data ------------------------------------------------------------------------------------------------------

def test_labels_and_classes_are_torchvision_imagefolders(tree):
    from torchvision.datasets import ImageFolder

    reference = ImageFolder(str(tree))  # it lists files without decoding them, the truncated one included
    samples, classes = scan_imagefolder(tree)
    assert classes == reference.classes == CLASSES
    assert samples == reference.samples and len(samples) == 37


def test_holdout_split_is_stratified_disjoint_and_seeded(tree):
    samples, _ = scan_imagefolder(tree)
    labels = [y for _, y in samples]
    train, val = holdout_split(labels, 0.25, seed=1)
    assert sorted(train + val) == list(range(len(samples))) and not set(train) & set(val)
    assert [sum(labels[i] == c for i in val) for c in range(3)] == [3, 3, 3]  # round(0.25 * 12 or 13)
    assert (train, val) == holdout_split(labels, 0.25, seed=1)
    assert val != holdout_split(labels, 0.25, seed=2)[1]
    assert holdout_split(labels, 0.0, seed=1) == (list(range(len(samples))), [])
    with pytest.raises(ValueError):
        holdout_split(labels, 1.0, seed=1)


def test_dataset_preprocesses_augments_and_survives_unreadable_files(tree):
    config = vision_model.get_config("matmamba_vision_fmnist", img_size=16, patch_size=4, num_classes=3)
    samples, _ = scan_imagefolder(tree)
    bad = next(i for i, (path, _) in enumerate(samples) if path.endswith(CORRUPT))
    good = bad + 1

    evaluation = ImageFolderDataset(samples, config, train=False)
    x, y, found = evaluation[good]
    assert found == [] and y == 1
    query = to_model_input(config, decode_image(samples[good][0], target_size=16))[0]
    assert torch.equal(x, query)  # an index build's and a query's decoding and preprocessing
    x, y, found = evaluation[bad]
    assert x is None and found[0][0] == samples[bad][0] and "runcated" in found[0][1]

    training = ImageFolderDataset(samples, config, train=True)
    a, ya, _ = training[(good, 11)]
    assert a.shape == (1, 16, 16) and ya == 1
    assert torch.equal(a, training[(good, 11)][0])  # the augmentation is a function of the seed
    assert not all(torch.equal(a, training[(good, s)][0]) for s in range(12, 16))
    x, y, found = training[(bad, 11)]  # replaced by the next readable sample, and reported
    assert torch.equal(x, training[(good, 11)][0]) and y == samples[good][1] and len(found) == 1

    images, labels, found = collate_skipping([evaluation[bad], evaluation[good], evaluation[0]])
    assert images.shape == (2, 1, 16, 16) and labels.tolist() == [1, 0] and len(found) == 1


def test_read_image_normalises_modes(tree):
    for path, _ in scan_imagefolder(tree)[0]:
        if not path.endswith(CORRUPT):
            assert read_image(path, 1).mode == "L" and read_image(path, 3).mode == "RGB"


def test_epoch_batches_shard_and_resume(tree):
    samples, _ = scan_imagefolder(tree)
    dataset = ImageFolderDataset(samples, vision_model.get_config("matmamba_vision_fmnist"), train=True)

    def batches(rank, world, epoch, start):
        sampler = torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=5, drop_last=True)
        s = train_module.EpochBatchSampler(sampler, 8 // world, len(samples) // 8, seed=5)
        s.set_epoch(epoch, start)
        return list(s)

    full = batches(0, 1, 2, 0)
    assert len(full) == 4 and batches(0, 1, 2, 1) == full[1:]  # a resumed epoch continues where it stopped
    assert full != batches(0, 1, 3, 0)
    ranks = [batches(r, 2, 2, 0) for r in range(2)]
    assert all(len(b) == 4 and len(b[0]) == 4 for b in ranks)
    seen = [i for b in ranks for batch in b for i, _ in batch]
    assert len(seen) == len(set(seen))  # the ranks' shares are disjoint


# -- training --------------------------------------------------------------------------------------------------

def test_imagefolder_training_end_to_end(tree, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--data", f"imagefolder:{tree}", "--epochs", "2", "--batch-size", "8", "--workers", "2",
                  "--set", "num_classes=10", *TINY_16) == 0
    captured = capsys.readouterr()
    assert f"warning: skipping unreadable image {tree / CORRUPT}" in captured.err
    assert "skipped 1 unreadable image(s)" in captured.err
    assert "3 classes, 34 training and 3 validation images" in captured.out

    result = json.loads((out / "result.json").read_text())
    assert result["num_classes"] == 3 and result["steps"] == 8 and result["epochs_done"] == 2.0
    assert set(result["val_top1"]) == {"D", "D/2", "D/4", "D/8"}
    assert [e["path"] for e in result["unreadable_images"]] == [str(tree / CORRUPT)]
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_top1" in r]
    assert [r["epoch"] for r in evals] == [1, 2] and evals[-1]["unreadable_images"] == 1

    model = vision_model.load_model(out / "model")
    assert model.config.num_classes == 3 and model.config.class_names == tuple(CLASSES)  # the tree beat --set
    assert model.config.img_size == 16 and model.config.in_chans == 1
    img = Image.open(tree / "emu" / "00.jpg")
    assert model(model.preprocess([img, img]), level=8).shape == (2, 3)


def test_imagefolder_separate_validation_tree(tree, tmp_path):
    val = tmp_path / "val"
    for name in ("cat", "emu"):  # a class may be missing: labels still follow the training tree
        (val / name).mkdir(parents=True)
        Image.open(tree / name / "01.png").save(val / name / "a.png")
    out = tmp_path / "run"
    assert _train(out, "--data", f"imagefolder:{tree}", "--val-data", f"imagefolder:{val}", "--epochs", "1",
                  "--batch-size", "12", "--workers", "0", "--levels", "1", *TINY_16) == 0
    result = json.loads((out / "result.json").read_text())
    assert set(result["val_top1"]) == {"D"} and result["steps"] == 37 // 12

    (val / "yak").mkdir()
    Image.open(tree / "cat" / "01.png").save(val / "yak" / "a.png")
    assert _train(tmp_path / "bad", "--data", f"imagefolder:{tree}", "--val-data", f"imagefolder:{val}",
                  "--workers", "0", *TINY_16) == 1  # a class the model cannot name: a clear error


def test_imagefolder_resume_is_bit_identical(tree, tmp_path, monkeypatch):
    args = ["--data", f"imagefolder:{tree}", "--epochs", "2", "--batch-size", "8", "--ckpt-every", "3", *TINY_16]
    assert _train(tmp_path / "whole", *args, "--workers", "0") == 0

    _kill_at(monkeypatch, 5)  # checkpoints at steps 3 and 6: dies in epoch 2 (4 steps an epoch), resumes from 3
    with pytest.raises(_Killed):
        _train(tmp_path / "resumed", *args, "--workers", "0")
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.undo()
    assert _train(tmp_path / "resumed", *args, "--workers", "2") == 0  # a worker count changes nothing either

    _assert_same_weights(tmp_path / "whole", tmp_path / "resumed")
    result = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert result["steps"] == 8 and len(result["unreadable_images"]) == 1


@pytest.mark.skipif(not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed (Debian package dataset-fashion-mnist)")
def test_fashion_mnist_resume_is_bit_identical(tmp_path, monkeypatch):
    args = ["--limit", "256", "--epochs", "2", "--batch-size", "64", "--ckpt-every", "3",
            "--mnm-samples", "1", *TINY]  # 4 steps an epoch; the config's drop-path stays on (the RNG state is
    # checkpointed), each step's Mix'n'Match widths come from its step number, and the conv stem's BatchNorm
    # statistics are part of the checkpoint
    assert _train(tmp_path / "whole", *args) == 0
    _resume_after_kill_matches_whole(tmp_path, monkeypatch, args)
    result = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert result["steps"] == 8 and set(result["test_top1"]) == {"D", "D/2", "D/4", "D/8"}
    assert vision_model.load_model(tmp_path / "resumed" / "model").config.num_classes == 10


def test_bad_data_specs_are_clear_errors(tmp_path, capsys):
    assert _train(tmp_path / "a", "--data", "cifar") == 1
    assert _train(tmp_path / "b", "--data", f"imagefolder:{tmp_path / 'missing'}") == 1
    assert _train(tmp_path / "c", "--val-data", f"imagefolder:{tmp_path}") == 1
    err = capsys.readouterr().err
    assert "unsupported training data 'cifar'" in err and "does not exist" in err and "--val-data is for" in err


def test_mix_n_match_sampling_draws_trained_widths_per_layer_reproducibly():
    config = vision_model.get_config("matmamba_vision_fmnist")
    tc = train_module.TrainConfig(mnm_samples=2)
    draws = [train_module.mnm_widths(config, tc, step, k) for step in range(50) for k in range(2)]
    assert all(len(w) == config.depth and set(w) <= {192, 96, 48, 24} for w in draws)
    assert len({tuple(w) for w in draws}) > 90  # per-layer choices, not a handful of uniform configurations
    assert draws[7] == train_module.mnm_widths(config, tc, 3, 1)  # a function of (seed, step, k) alone
    with pytest.raises(ValueError, match="needs --schedule all"):
        train_module.train(train_module.TrainConfig(mnm_samples=1, schedule="cycle"))


@pytest.mark.skipif(not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed (Debian package dataset-fashion-mnist)")
def test_ema_mixing_and_cosine_head_resume_bit_identical_and_save_the_average(tmp_path, monkeypatch, capsys):
    args = ["--limit", "256", "--epochs", "2", "--batch-size", "64", "--ckpt-every", "3", "--ema-decay", "0.9",
            "--mix-prob", "0.5", "--mixup-alpha", "0", "--set", "head=cosine", *TINY]
    targets = []
    real_losses = train_module.level_losses

    def level_losses(model, x, y, *rest, **kw):
        targets.append(bool((y.amax(-1) < 0.91 - 1e-4).all()))  # 0.91: a label smoothed by 0.1, unmixed
        return real_losses(model, x, y, *rest, **kw)

    monkeypatch.setattr(train_module, "level_losses", level_losses)
    assert _train(tmp_path / "whole", *args) == 0
    assert 0 < sum(targets) < len(targets) == 8  # some steps mixed (soft targets), some not
    _resume_after_kill_matches_whole(tmp_path, monkeypatch, args)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(whole["ema"][k], resumed["ema"][k]) for k in whole["ema"])

    saved = vision_model.load_model(tmp_path / "resumed" / "model")  # the average, not the last step's weights
    assert saved.config.head == "cosine"
    ema_w, raw_w = whole["ema"]["head.weight"], whole["model"]["head.weight"]
    assert not torch.equal(ema_w, raw_w)
    torch.testing.assert_close(saved.head.weight, ema_w.to(torch.bfloat16).float())
    result = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert set(result["test_top1"]) == set(result["test_top1_raw"]) == {"D", "D/2", "D/4", "D/8"}

    state = {k: v for k, v in whole.items() if k != "ema"}  # a checkpoint trained without an EMA cannot grow one
    (tmp_path / "noema").mkdir()
    torch.save(state, tmp_path / "noema" / "checkpoint.pt")
    assert _train(tmp_path / "noema", *args) == 1
    assert "was trained without --ema-decay" in capsys.readouterr().err


def test_time_budget_fits_the_schedule_to_the_time_left_without_evaluations():
    """--max-minutes (training/budget.py), on a clock the test moves: the first step (compiling) is not in the rate,
    a pause (an evaluation) counts neither in the rate nor in the budget, the plan is refitted once from the steps
    since the first fit, and the run is out of time when the budget's training seconds are spent."""
    from training.budget import TimeBudget, warmup_steps
    now = [0.0]
    budget = TimeBudget(1.0, first_step=0, clock=lambda: now[0])
    now[0] = 10.0  # the first step compiles for 10 s
    budget.first_step_done(1)
    for step in range(2, 21):
        now[0] += 0.1
        if step == 10:
            with budget.pause():
                now[0] += 20.0  # an evaluation
        assert budget.due(step) == (step == 20)
    # 19 steps in 1.9 s of training: 10 steps/s; 11.9 s spent of the 57 s aimed at (95 % of 60)
    assert abs(budget.fit(20, 10 ** 6, 10 ** 6) - (20 + 10 * (57 - 11.9))) <= 1
    for step in range(21, 101):
        now[0] += 0.2  # slower once warm
    assert budget.due(100)
    assert abs(budget.fit(100, 10 ** 6, 10 ** 6) - (100 + 5 * (57 - 27.9))) <= 1
    assert not budget.due(100) and not budget.due(200)  # fitted for good
    assert not budget.out_of_time()
    now[0] += 60 - 27.9 + 0.01
    assert budget.out_of_time() and round(budget.elapsed(), 2) == 60.01
    resumed = TimeBudget(1.0, first_step=500, planned=True, clock=lambda: now[0])
    resumed.first_step_done(501)
    assert not resumed.due(520) and not resumed.due(600)
    unlimited = TimeBudget(None, first_step=0, clock=lambda: now[0])
    unlimited.first_step_done(1)
    assert not unlimited.due(20) and not unlimited.out_of_time()
    # a plan shorter than four warm-ups shortens the warm-up; a fixed-length run keeps it
    assert warmup_steps(40, 100, budgeted=True) == 25 and warmup_steps(40, 1000, budgeted=True) == 40
    assert warmup_steps(40, 100, budgeted=False) == 40
