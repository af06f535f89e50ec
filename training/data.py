"""Training data: Fashion-MNIST (read by `vision_model.datasets`) and any torchvision ImageFolder tree.

An ImageFolder tree is DIR/<class>/**/<image>; classes and labels are exactly torchvision's ImageFolder's (sorted
class folders, its image extensions). `ImageFolderDataset` decodes with Pillow and prepares images as
`preprocess.to_model_input` does; an image that cannot be decoded is reported, never fatal (see the class).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from vision_model.config import MatMambaVisionConfig
from vision_model.images import UnreadableImage, decode_image  # noqa: F401  (UnreadableImage: re-exported)
from vision_model.preprocess import fit_to_size, model_pixels, to_mode, to_model_input


# -- ImageFolder trees -----------------------------------------------------------------------------------------

IMAGEFOLDER_PREFIX = "imagefolder:"
# train-time crop: a box covering this fraction of the image's area, with an aspect ratio in TRAIN_CROP_RATIO
TRAIN_CROP_SCALE = (0.25, 1.0)
TRAIN_CROP_RATIO = (3 / 4, 4 / 3)
MAX_CONSECUTIVE_UNREADABLE = 50  # a training sample gives up after this many unreadable replacements in a row

Samples = list[tuple[str, int]]  # (path, label), as torchvision's ImageFolder.samples


def imagefolder_root(spec: str) -> Path:
    """The folder an 'imagefolder:DIR' spec names."""
    if not spec.startswith(IMAGEFOLDER_PREFIX):
        raise ValueError(f"expected {IMAGEFOLDER_PREFIX}DIR, got {spec!r}")
    root = Path(spec[len(IMAGEFOLDER_PREFIX):]).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    return root


def scan_imagefolder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> tuple[Samples, list[str]]:
    """(samples, classes) of an ImageFolder tree, as torchvision's ImageFolder lists them.

    With `classes` (a validation tree scored against a training tree's labels) labels follow that list; a class
    folder missing here is allowed, one the list does not know is an error.
    """
    root = str(root)
    if classes is None:
        classes, class_to_idx = find_classes(root)
        return make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS), list(classes)
    found, _ = find_classes(root)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root} has class folders the training data does not: {unknown}")
    class_to_idx = {name: i for i, name in enumerate(classes)}
    return make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True), list(classes)


def holdout_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) sample indices: round(fraction * n_c) images of every class c held out, chosen by `seed`."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the validation fraction must be in [0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    val = []
    for label in sorted(by_class):
        members = by_class[label]
        k = round(fraction * len(members))
        val += [members[j] for j in torch.randperm(len(members), generator=gen)[:k].tolist()]
    held = set(val)
    return [i for i in range(len(labels)) if i not in held], sorted(val)


def read_image(path: str | os.PathLike, in_chans: int, target_size: int | None = None) -> Image.Image:
    """Decode a file (vision_model.images.decode_image) into an 8-bit 'L' or 'RGB' image, or raise
    UnreadableImage."""
    return to_mode(decode_image(path, target_size=target_size), in_chans)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of dataset item `index` in `epoch`: independent of batch size, workers and world size."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (1 << 62)


def random_crop_box(width: int, height: int, gen: torch.Generator, scale=TRAIN_CROP_SCALE,
                    ratio=TRAIN_CROP_RATIO) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random box of `scale` of the area and aspect ratio (w/h) in `ratio`.

    Like torchvision's RandomResizedCrop.get_params (ten tries, then the whole image), but drawing from `gen`.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=gen).item()
        aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=gen).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = torch.randint(0, width - w + 1, (1,), generator=gen).item()
            top = torch.randint(0, height - h + 1, (1,), generator=gen).item()
            return left, top, w, h
    return 0, 0, width, height


def train_image(config: MatMambaVisionConfig, img: Image.Image, gen: torch.Generator) -> Tensor:
    """`to_model_input` with train-time augmentation drawn from `gen`.

    Mode handling and the dark-background inversion are to_model_input's (on the whole image); then a random
    box of 25-100% of the area (aspect 3:4..4:3) is cut out and fitted to img_size exactly as inference fits a
    whole image (config.crop: 'center' resizes the short side and centre-crops, 'pad' fits the long side and
    pads with the border colour), and flipped left-right with probability 1/2.
    """
    x = model_pixels(config, img)
    left, top, w, h = random_crop_box(x.shape[-1], x.shape[-2], gen)
    x = fit_to_size(x[:, top:top + h, left:left + w], config.img_size, config.crop)
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(-1)
    return to_model_input(config, x)[0]


class ImageFolderDataset(Dataset):
    """ImageFolder samples decoded with Pillow, prepared for a model config.

    Items are `(image, label, unreadable)`: `unreadable` lists the (path, reason) of files that could not be
    decoded on the way. Keys are an index, or `(index, augmentation seed)` for training (`train=True`: the
    augmentation is drawn from that seed, so an item's pixels depend only on it).
    On an unreadable file a training item is replaced by the next readable one in sample order (batches keep
    their size, and every rank its step count); an evaluation item comes back as None (`collate_skipping` drops it).
    """

    def __init__(self, samples: Samples, config: MatMambaVisionConfig, train: bool):
        self.samples = list(samples)
        self.config = config
        self.train = train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, 0)
        unreadable = []
        for k in range(min(len(self.samples), MAX_CONSECUTIVE_UNREADABLE)):
            path, label = self.samples[(index + k) % len(self.samples)]
            try:
                # evaluation decodes as an index build or a query does; training crops, so it keeps every pixel
                img = read_image(path, self.config.in_chans, None if self.train else self.config.img_size)
            except UnreadableImage as e:
                unreadable.append((path, e.reason))
                if not self.train:
                    return None, label, unreadable
                continue
            if self.train:
                x = train_image(self.config, img, torch.Generator().manual_seed(seed))
            else:
                x = to_model_input(self.config, img)[0]
            return x, label, unreadable
        raise RuntimeError(f"{len(unreadable)} unreadable images in a row from {self.samples[index][0]}; "
                           f"the last: {unreadable[-1][1]}")


def collate_skipping(batch):
    """(images (b, c, h, w) or None when every item was unreadable, labels (b,), [(path, reason), ...])."""
    kept = [(x, y) for x, y, _ in batch if x is not None]
    unreadable = [entry for _, _, found in batch for entry in found]
    images = torch.stack([x for x, _ in kept]) if kept else None
    return images, torch.tensor([y for _, y in kept], dtype=torch.long), unreadable
