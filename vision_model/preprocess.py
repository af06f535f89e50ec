"""PIL image (any size, any mode) -> the tensor a MatMamba-Vision model was trained on."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from torch import Tensor

from .config import MatMambaVisionConfig


def to_mode(img: Image.Image, in_chans: int) -> Image.Image:
    """Normalise an image's mode to 8-bit 'L' (1 channel) or 'RGB' (3 channels).

    Handles EXIF rotation, animations (first frame), palettes and transparency (composited on white),
    16/32-bit integer and float images (rescaled to their own range), CMYK, LAB and the rest via PIL.
    """
    if getattr(img, "is_animated", False):
        img.seek(0)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("L" if in_chans == 1 else "RGB")


def _fit(img: Tensor, size: int, crop: str) -> Tensor:
    h, w = img.shape[-2:]
    if crop == "center":
        img = TF.resize(img, size, antialias=True)  # short side -> size
        return TF.center_crop(img, [size, size])
    scale = size / max(h, w)  # long side -> size, then pad with the border colour
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        img = TF.resize(img, [nh, nw], antialias=True)
    top, left = (size - nh) // 2, (size - nw) // 2
    fill = _border(img).tolist()
    return TF.pad(img, [left, top, size - nw - left, size - nh - top], fill=fill)


def _border(img: Tensor) -> Tensor:
    """Mean colour of the one-pixel frame around an image (c, h, w)."""
    frame = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], dim=-1).float()
    return frame.mean(-1)


def preprocess_uint8(config: MatMambaVisionConfig, img: Image.Image) -> Tensor:
    """PIL image -> uint8 (in_chans, img_size, img_size): the model's pixels before normalisation (what index
    builds move between processes and to the GPU: a quarter of the bytes of the float input)."""
    img = to_mode(img, config.in_chans)
    x = TF.pil_to_tensor(img)  # uint8 (c, h, w)
    if config.dark_background and _border(x).mean() > 127:
        x = 255 - x  # a product photo on white, for a model trained on light-on-dark images
    return _fit(x, config.img_size, config.crop)


def preprocess_image(config: MatMambaVisionConfig, img: Image.Image) -> Tensor:
    return normalize_uint8(config, preprocess_uint8(config, img))


def preprocess_images(config: MatMambaVisionConfig, images: Image.Image | Sequence[Image.Image]) -> Tensor:
    if isinstance(images, Image.Image):
        images = [images]
    if not images:
        raise ValueError("preprocess needs at least one image")
    return torch.stack([preprocess_image(config, img) for img in images])


def normalize_uint8(config: MatMambaVisionConfig, x: Tensor) -> Tensor:
    """Already-sized uint8 images (b, c, h, w), e.g. Fashion-MNIST arrays -> model input."""
    x = TF.to_dtype(x, torch.float32, scale=True)
    return TF.normalize(x, list(config.mean), list(config.std))
