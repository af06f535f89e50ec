"""Multi-view embeddings (test-time augmentation): an image embedded as the normalised sum of the unit embeddings of
itself, its mirror and small shifts of both.

An index pays for this once, on the database side (`matsearch index build --views`). There it lifts 1-NN retrieval
at every query level and costs a query nothing: on Fashion-MNIST, an 18-view database raised 1-NN by 0.17 to 0.38 pt
at D, D/2, D/4 and D/8 (docs/notes.md, section 17).

View sets. A shift moves the model input by whole pixels, and the border that comes in is black, as in the training
augmentation:
    1       the image alone (the default)
    flip    the image and its mirror (2 views)
    shift1  those two, and the four 1-px shifts of each (10 views)
    shift2  shift1, plus the four 2-px shifts of each (18 views)
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .preprocess import to_model_input

View = tuple[int, int, bool]  # (dy, dx, mirrored)
DEFAULT_VIEWS = "1"


def _shifted_and_mirrored(max_shift: int) -> list[View]:
    shifts = [(0, 0)] + [s for r in range(1, max_shift + 1) for s in ((r, 0), (-r, 0), (0, r), (0, -r))]
    return [(dy, dx, mirrored) for dy, dx in shifts for mirrored in (False, True)]


VIEW_SETS: dict[str, list[View]] = {"1": [(0, 0, False)], "flip": _shifted_and_mirrored(0),
                                    "shift1": _shifted_and_mirrored(1), "shift2": _shifted_and_mirrored(2)}


def views_of(view_set: str) -> list[View]:
    try:
        return VIEW_SETS[view_set]
    except KeyError:
        raise ValueError(f"unknown view set {view_set!r}; choose from {', '.join(VIEW_SETS)}") from None


def describe(view_set: str) -> str:
    """'' for one view, else e.g. 'the average of 18 views (shift2)': for titles, captions and `index info`."""
    return "" if view_set == DEFAULT_VIEWS else f"the average of {len(views_of(view_set))} views ({view_set})"


def view(images: Tensor, dy: int, dx: int, mirrored: bool, background: Tensor | None = None) -> Tensor:
    """A batch (b, c, h, w) moved down dy and right dx pixels, then mirrored if asked. The border that comes in
    takes the value `background` (per channel, (c, 1, 1)), or 0 without it: black for uint8 images."""
    pad = max(abs(dy), abs(dx))
    if pad:
        if background is not None:  # shift the offset from the background, so the padding lands on it
            return view(images - background, dy, dx, mirrored) + background
        h, w = images.shape[-2:]
        images = F.pad(images, (pad, pad, pad, pad))[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w]
    return images.flip(-1) if mirrored else images


def black(config) -> Tensor:
    """The model-input value (c, 1, 1) of a black pixel: the background of shifted views of preprocessed images."""
    zeros = torch.zeros(1, config.in_chans, config.img_size, config.img_size, dtype=torch.uint8)
    return to_model_input(config, zeros)[0, :, :1, :1]


def embed_views(embed: Callable[[Tensor], np.ndarray], pixels: Tensor, view_set: str,
                background: Tensor | None) -> np.ndarray:
    """The normalised sum of embed(view) over the views of `view_set`. `embed` maps model input (b, c, h, w) to
    unit rows (b, d) float32. A single-view set returns embed(pixels) unchanged."""
    views = views_of(view_set)
    if views == [(0, 0, False)]:
        return embed(pixels)
    total = sum(embed(view(pixels, *v, background=background)).astype(np.float64) for v in views)
    return (total / np.linalg.norm(total, axis=1, keepdims=True)).astype(np.float32)
