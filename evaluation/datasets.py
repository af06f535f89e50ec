"""Fashion-MNIST as model input, fast: uint8 arrays normalised in bulk rather than decoded image by image."""
from __future__ import annotations

import numpy as np
import torch

from vision_model.datasets import load_fashion_mnist
from vision_model.preprocess import to_model_input
from vision_model.views import DEFAULT_VIEWS, black, embed_views

from retrieval.encoder import QueryEncoder
from retrieval.knn import InMemoryDatabase
from retrieval.submodel import Submodel

_cache: dict[str, tuple[torch.Tensor, np.ndarray]] = {}


def fashion_mnist(split: str) -> tuple[torch.Tensor, np.ndarray]:
    """(uint8 images (n, 1, 28, 28), int64 labels (n,)), read once per process."""
    if split not in _cache:
        images, labels = load_fashion_mnist(split)
        _cache[split] = images, labels.numpy()
    return _cache[split]


def fashion_mnist_rows(model, split: str, rows: slice | np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Model input and labels of some rows of a Fashion-MNIST split."""
    images, labels = fashion_mnist(split)
    rows = np.arange(len(labels))[rows] if isinstance(rows, slice) else np.asarray(rows)
    return to_model_input(model.config, images[torch.from_numpy(rows)]), labels[rows]


def encode_database(encoder: QueryEncoder, pixels: torch.Tensor, labels: np.ndarray,
                    views: str = DEFAULT_VIEWS) -> InMemoryDatabase:
    """A full-model (level 1) database of these images, as an index build with these views would store it."""
    full = Submodel(level=1)
    return InMemoryDatabase(embed_views(lambda x: encoder.embed(x, full), pixels, views, black(encoder.config)),
                            labels)
