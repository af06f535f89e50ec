"""Fashion-MNIST's idx.gz files, read by the index, training, evaluation and the benchmarks alike.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist); set
MATSEARCH_FASHION_MNIST to use another folder holding the same four files.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
SPLITS = tuple(_FILES)


class DatasetNotFoundError(FileNotFoundError):
    pass


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get("MATSEARCH_FASHION_MNIST") or DEFAULT_FASHION_MNIST_DIR)


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:  # 0x08: unsigned bytes
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    if ndim != expected_ndim:
        raise ValueError(f"{path}: expected {expected_ndim} dimensions, found {ndim}")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {body.size} bytes for shape {shape}")
    return body.reshape(shape)


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """(images uint8 (n, 1, 28, 28), labels int64 (n,)) of split 'train' (60k) or 'test' (10k)."""
    if split not in _FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; choose from {SPLITS}")
    folder = fashion_mnist_dir(root)
    paths = [folder / name for name in _FILES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST files {missing} not found in {folder}. Install them with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set MATSEARCH_FASHION_MNIST to a "
            "folder holding the four idx .gz files.")
    images = _read_idx(paths[0], 3)
    labels = _read_idx(paths[1], 1)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels in split {split!r}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
