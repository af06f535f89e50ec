"""Distillation from a convolutional teacher: `matsearch train --arch resnet`, then `--teacher DIR`."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import vision_model
import training.train as train_module
from vision_model.datasets import fashion_mnist_dir
from training.model_card import _command, recipe_differences
from training.teacher import ResNetTeacher, build_network, load_teacher
from test_train import TINY, _resume_after_kill_matches_whole, _train

needs_fmnist = pytest.mark.skipif(not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
                                  reason="Fashion-MNIST not installed (Debian package dataset-fashion-mnist)")
SMALL = ["--limit", "256", "--batch-size", "64"]


class _SelfTeacher(torch.nn.Module):
    """A frozen copy of the student at full width: its soft outputs are what the student's D pass predicts."""

    def __init__(self, student):
        super().__init__()
        self.net = copy.deepcopy(student).eval()

    def forward(self, x):
        return self.net(x, level=1)


def test_every_pass_is_pulled_towards_the_teachers_soft_outputs():
    torch.manual_seed(0)
    config = vision_model.get_config("matmamba_vision_fmnist", depth=2, d_model=32, d_state=8, headdim=8,
                                     drop_path_rate=0.0)
    student = vision_model.MatMambaVision(config, ssd_backend="torch").eval()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    teacher = _SelfTeacher(student)
    levels = (1, 2, 4, 8)

    pure = train_module.level_losses(student, x, y, train_module.TrainConfig(teacher_weight=1.0), levels,
                                     torch.autocast("cpu", enabled=False), teacher=teacher)
    assert pure[1] == pytest.approx(0.0, abs=1e-5)  # D matches its own copy exactly: nothing left to learn
    assert all(pure[lv] > 1e-3 for lv in (2, 4, 8))  # the narrower passes do not, and are pulled towards it

    half = train_module.level_losses(student, x, y, train_module.TrainConfig(teacher_weight=0.5), levels,
                                     torch.autocast("cpu", enabled=False), teacher=teacher)
    with torch.no_grad():
        ce = F.cross_entropy(student(x, level=1), y, label_smoothing=0.1).item()
    assert half[1] == pytest.approx(0.5 * ce, rel=1e-4)


def test_param_groups_decay_conv_weights_of_the_teacher_only():
    config = vision_model.get_config("matmamba_vision_fmnist")
    teacher, encoder = ResNetTeacher(config), vision_model.MatMambaVision(config, ssd_backend="torch")
    decayed, kept = train_module.param_groups(teacher, 0.05)
    assert {p.ndim for p in decayed["params"]} == {2, 4} and {p.ndim for p in kept["params"]} == {1}
    decayed, kept = train_module.param_groups(encoder, 0.05)
    assert {p.ndim for p in decayed["params"]} == {2}  # the encoder's recipe: 2-D weights only
    assert any(p.ndim == 4 for p in kept["params"])  # its conv stem is not decayed
    assert teacher(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="one width"):
        teacher(torch.randn(2, 1, 28, 28), level=4)


# the default teacher's structure (a full-resolution ResNet of BasicBlocks) at a fraction of its width and depth: the
# default ResNet-18 made the end-to-end test below the slowest of the suite on CPU, training and running the teacher
SMALL_TEACHER = dict(channels=[16, 16, 32, 64], layers=[1, 1, 1, 1])


def _small_teacher(arch, config, ssd_backend="auto"):
    if arch == "resnet":
        return ResNetTeacher(config, **SMALL_TEACHER, drop_path_rate=config.drop_path_rate)
    return build_network(arch, config, ssd_backend=ssd_backend)


@needs_fmnist
def test_teacher_then_distilled_student_end_to_end_and_resumable(tmp_path, monkeypatch, capsys):
    teacher_dir = tmp_path / "teacher"
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "build_network", _small_teacher)
        assert _train(teacher_dir, "--arch", "resnet", "--levels", "1", "--epochs", "1", *SMALL) == 0
    teacher = load_teacher(teacher_dir / "model")
    assert teacher.arch["name"] == "resnet" and not any(p.requires_grad for p in teacher.parameters())
    assert {k: teacher.arch[k] for k in SMALL_TEACHER} == SMALL_TEACHER  # loaded as it was trained
    teacher_top1 = json.loads((teacher_dir / "result.json").read_text())["test_top1"]["D"]

    # a teacher is no encoder: every command that loads one refuses it by name
    with pytest.raises(ValueError, match="distillation teacher, not a MatMamba-Vision encoder"):
        vision_model.load_model(teacher_dir / "model")
    assert _train(tmp_path / "x", "--arch", "resnet", *SMALL) == 1  # four levels of a one-width network
    assert _train(tmp_path / "y", "--teacher", str(tmp_path / "x"), *SMALL, *TINY) == 1  # no teacher there
    assert _train(tmp_path / "z", "--teacher", str(teacher_dir / "model"), "--set", "img_size=32", *SMALL,
                  *TINY) == 1  # the teacher never saw 32-pixel images
    err = capsys.readouterr().err
    assert "use --levels 1" in err and "is not a saved teacher" in err
    assert "trained on other data than this run" in err and "img_size 28 vs 32" in err

    args = ["--teacher", str(teacher_dir / "model"), "--epochs", "2", "--ckpt-every", "3", *SMALL, *TINY]
    assert _train(tmp_path / "whole", *args) == 0
    _resume_after_kill_matches_whole(tmp_path, monkeypatch, args)
    result = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert result["teacher"]["weights_sha256"] == vision_model.weights_hash(teacher_dir / "model")
    assert result["teacher"]["test_top1"] == pytest.approx(teacher_top1, abs=0.5)  # eval under the same data
    assert result["teacher"]["train_config"]["arch"] == "resnet"
    assert set(result["test_top1"]) == {"D", "D/2", "D/4", "D/8"}

    # the model card names the teacher, the command that trained it, and the recipe gap to plain runs
    student_meta = vision_model.load_model(tmp_path / "resumed" / "model").meta
    assert "--arch resnet --levels 1" in _command(result["teacher"]["train_config"])
    assert "--teacher-weight 0.5" in _command(student_meta["train_config"])
    plain = {"train_config": {**student_meta["train_config"], "teacher": None}, "result": {}}
    assert recipe_differences(plain, student_meta)["distillation"][0] == "none"
    assert recipe_differences(student_meta, student_meta) == {}
