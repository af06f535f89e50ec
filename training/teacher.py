"""A convolutional teacher for knowledge distillation (`matsearch train --arch resnet`, then `--teacher DIR`).

Small-data vision transformers learn more from a CNN's soft outputs than from the labels alone (DeiT's recipe); the
teacher is a timm ResNet-18 whose stem keeps the full resolution of small images (3×3 stride-1 convolution, no max
pool), trained by the same loop, data, augmentation and schedule as the encoder. It shares the encoder's data config
(image size, channels, normalisation, classes), so it reads the very batches the student trains on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from safetensors.torch import load_file
from timm.models.resnet import BasicBlock, ResNet
from torch import Tensor

from vision_model.config import MatMambaVisionConfig
from vision_model.hub import CONFIG_FILE, WEIGHTS_FILE
from vision_model.model import MatMambaVision

ARCHS = ("matmamba", "resnet")


class ResNetTeacher(nn.Module):
    # conv weights are 4-D: they are decayed too (the encoder decays its 2-D weights only); norms and biases are not
    weight_decay_ndims = (2, 4)

    def __init__(self, config: MatMambaVisionConfig, channels: Sequence[int] = (64, 64, 128, 256),
                 layers: Sequence[int] = (2, 2, 2, 2), drop_path_rate: float = 0.0):
        super().__init__()
        self.config = config
        self.arch = {"name": "resnet", "channels": list(channels), "layers": list(layers),
                     "drop_path_rate": drop_path_rate}
        self.net = ResNet(BasicBlock, tuple(layers), channels=tuple(channels), in_chans=config.in_chans,
                          num_classes=config.num_classes, drop_path_rate=drop_path_rate)
        if config.img_size <= 64:  # small images: no stride-4 stem, the first stage sees every pixel
            self.net.conv1 = nn.Conv2d(config.in_chans, self.net.bn1.num_features, 3, 1, 1, bias=False)
            self.net.maxpool = nn.Identity()

    def no_weight_decay(self) -> set[str]:
        return set()  # weight_decay_ndims already leaves out every 1-D norm weight and bias

    def forward(self, x: Tensor, level: int | None = None, widths: Sequence[int] | None = None,
                backend: str | None = None, return_embedding: bool = False):
        """The encoder's call signature, so the training loop and its evaluation run either; one width only."""
        if widths is not None or level not in (None, 1):
            raise ValueError("a ResNet teacher has one width: no level or Mix'n'Match widths")
        emb = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        logits = self.net.get_classifier()(emb)
        return (logits, emb) if return_embedding else logits


def build_network(arch: str, config: MatMambaVisionConfig, ssd_backend: str = "auto") -> nn.Module:
    """The network `matsearch train --arch` trains on `config`'s data."""
    if arch == "matmamba":
        return MatMambaVision(config, ssd_backend=ssd_backend)
    if arch == "resnet":
        return ResNetTeacher(config, drop_path_rate=config.drop_path_rate)
    raise ValueError(f"unknown --arch {arch!r}: one of {', '.join(ARCHS)}")


def load_teacher(directory: str | os.PathLike, device: str | torch.device = "cpu") -> ResNetTeacher:
    """A teacher saved by `matsearch train --arch resnet` (its run's model/ folder), in eval mode."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not a saved teacher: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                                f"(the model/ folder of a `matsearch train --arch resnet` run)")
    doc = json.loads(path.read_text())
    arch = doc.get("arch")
    if not arch or arch.get("name") != "resnet":
        raise ValueError(f"{directory} holds a MatMamba-Vision encoder, not a ResNet teacher "
                         f"(train one with `matsearch train --arch resnet --levels 1`)")
    teacher = ResNetTeacher(MatMambaVisionConfig.from_dict(doc["config"]), arch["channels"], arch["layers"],
                            arch.get("drop_path_rate", 0.0))
    state = load_file(str(directory / WEIGHTS_FILE))
    teacher.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    teacher.meta = doc.get("meta", {})
    return teacher.to(device).eval().requires_grad_(False)


def check_teacher_fits(teacher: ResNetTeacher, config: MatMambaVisionConfig, where: str) -> None:
    """The teacher must read the student's batches and score the student's classes."""
    fields = ("img_size", "in_chans", "num_classes", "class_names", "mean", "std", "crop")
    plain = lambda v: tuple(v) if isinstance(v, list) else v  # JSON gives lists where the config had tuples
    differ = [f"{f} {getattr(teacher.config, f)!r} vs {getattr(config, f)!r}" for f in fields
              if plain(getattr(teacher.config, f)) != plain(getattr(config, f))]
    if differ:
        raise ValueError(f"teacher {where} was trained on other data than this run (teacher vs student: "
                         + "; ".join(differ) + ")")
