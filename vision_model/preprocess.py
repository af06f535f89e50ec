"""Images -> the tensor a MatMamba-Vision model was trained on: `to_model_input`, the one way in.

    x = to_model_input(config, pil_image_or_images)     # (n, c, img_size, img_size) float32
    x = to_model_input(config, uint8_pixels)             # (n, c, img_size, img_size) arrays: normalised only

PIL images (any size, any mode; vision_model.images decodes files) are flattened to the model's channels,
inverted for a model trained on light-on-dark images when their border is light, fitted to img_size (config.crop)
and normalised. uint8 pixels already at the model's shape (Fashion-MNIST arrays, training batches on any device)
are only normalised, exactly as in training; uint8 pixels of another shape go through the PIL path.
"""
from __future__ import annotations

import logging
import threading
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .config import MatMambaVisionConfig
from .images import flatten, original_size

log = logging.getLogger(__name__)

ModelInput = Union[Image.Image, Sequence[Image.Image], Tensor, np.ndarray]
# An image whose short side is this many times the model's input size or more is "much larger" than what the
# model was trained on: most of what it shows is averaged away before the model sees it.
MUCH_LARGER = 16
COLOUR_CHROMA = 8.0  # mean |R-G| + |G-B| (0-255 scale) above which an image counts as a colour image


def decode_size(config: MatMambaVisionConfig) -> int:
    """The smallest size an image must be decoded at for `to_model_input` to see the same pixels as from the full
    image: the short side the preprocessing resizes to before its crop (resize_size), else img_size."""
    return max(config.img_size, config.resize_size or 0)


def to_mode(img: Image.Image, in_chans: int) -> Image.Image:
    """An image as the model's channels see it: 8-bit 'L' (1 channel) or 'RGB' (3), flattened as a person sees it
    (vision_model.images.flatten: first frame, transparency on a contrasting background, 16-bit rescaled)."""
    img = flatten(img)
    mode = "L" if in_chans == 1 else "RGB"
    return img if img.mode == mode else img.convert(mode)


def fit_to_size(img: Tensor, size: int, crop: str, resize_size: int | None = None) -> Tensor:
    """uint8 (c, h, w) -> (c, size, size), or a batch of same-sized images (n, c, h, w) -> (n, c, size, size):
    "center": short side to resize_size (default size), centre crop; else long side to size and padding with each
    image's border colour. PyTorch's own ops, not torchvision's (whose import costs
    a query more than the query itself): the same antialiased bilinear interpolation on uint8 that torchvision's
    resize calls on a CPU with AVX2, the same sizes, crop offsets and fill (tests/test_images.py checks it pixel
    for pixel against torchvision)."""
    h, w = img.shape[-2:]
    if crop == "center":
        short = resize_size or size  # the short side -> short, the long side in proportion, rounded down
        nh, nw = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
        return _center_crop(_resize(img, nh, nw), size)
    scale = size / max(h, w)  # long side -> size, then pad with the border colour
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = _resize(img, nh, nw)
    top, left = (size - nh) // 2, (size - nw) // 2
    # the fill as uint8, truncated as a float-to-integer cast truncates; computed where the pixels are (no host sync)
    fill = _border(img).to(img.dtype)
    out = fill[..., None, None].expand(*img.shape[:-2], size, size).clone()
    out[..., top:top + nh, left:left + nw] = img
    return out


def _resize(img: Tensor, nh: int, nw: int) -> Tensor:
    """uint8 (c, h, w) or (n, c, h, w) -> the same with (nh, nw), bilinear with antialiasing (a box-like average
    when shrinking)."""
    if (nh, nw) == tuple(img.shape[-2:]):
        return img
    batch = img if img.ndim == 4 else img[None]
    if batch.dtype == torch.uint8 and batch.device.type != "cpu":
        # uint8 interpolation is a CPU kernel; elsewhere in float, rounded back (as torchvision does off the CPU)
        out = F.interpolate(batch.float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    else:
        out = F.interpolate(batch, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    return out if img.ndim == 4 else out[0]


def _center_crop(img: Tensor, size: int) -> Tensor:
    """The centre size x size of (c, h, w) or (n, c, h, w), zero-padded first where a side is shorter than size."""
    h, w = img.shape[-2:]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        img = F.pad(img, [pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2])
        h, w = img.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img[..., top:top + size, left:left + size]


def _border(img: Tensor) -> Tensor:
    """Mean colour of the one-pixel frame around an image (c, h, w) -> (c,), or of each of a batch -> (n, c)."""
    frame = torch.cat([img[..., 0, :], img[..., -1, :], img[..., :, 0], img[..., :, -1]], dim=-1).float()
    return frame.mean(-1)


def model_pixels(config: MatMambaVisionConfig, img: Image.Image) -> Tensor:
    """uint8 (c, h, w) of an image at its own size, in the model's channels, inverted for a model trained on
    light-on-dark images when the image's border is light (a product photo on white). Training crops from this."""
    domain_check(config, img)
    arr = np.array(to_mode(img, config.in_chans), dtype=np.uint8)  # (h, w) or (h, w, c), a copy of its own
    x = torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    if config.dark_background and _border(x).mean() > 127:
        x = 255 - x
    return x


def fitted_pixels_batch(config: MatMambaVisionConfig, x: Tensor) -> Tensor:
    """`fitted_pixels` for a batch of same-sized decoded images on any device: uint8 (n, 1 or 3, h, w), 'L' or 'RGB'
    content -> uint8 (n, in_chans, img_size, img_size). The same steps as the PIL path (the model's channels with
    Pillow's RGB->L weights and rounding, the light-border inversion of dark-background models, the fit), each
    image on its own terms, without a host synchronisation: what an index build runs on the GPU after decoding."""
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 (n, 1 or 3, h, w), got {x.dtype} {tuple(x.shape)}")
    if config.in_chans == 1 and x.shape[1] == 3:
        r, g, b = x.to(torch.int32).unbind(1)
        x = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)[:, None]
    elif config.in_chans == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if config.dark_background:
        light = _border(x).mean(1) > 127
        x = torch.where(light.view(-1, 1, 1, 1), 255 - x, x)
    return fit_to_size(x, config.img_size, config.crop, config.resize_size)


def _normalize(config: MatMambaVisionConfig, x: Tensor) -> Tensor:
    """uint8 -> float32 in [0, 1] -> (x - mean) / std per channel, the same float operations as torchvision's
    to_dtype(scale=True) and normalize."""
    x = x.to(torch.float32).mul_(1.0 / 255)
    shape = (-1, 1, 1)
    mean = torch.as_tensor(config.mean, dtype=torch.float32, device=x.device).view(shape)
    std = torch.as_tensor(config.std, dtype=torch.float32, device=x.device).view(shape)
    return x.sub_(mean).div_(std)


def fitted_pixels(config: MatMambaVisionConfig, img: Image.Image) -> Tensor:
    """uint8 (in_chans, img_size, img_size): the model's pixels before normalisation, what an index build moves
    between processes and to the GPU (a quarter of the bytes of the float input); `to_model_input` normalises them."""
    return fit_to_size(model_pixels(config, img), config.img_size, config.crop, config.resize_size)


def _from_pil(config: MatMambaVisionConfig, img: Image.Image) -> Tensor:
    return _normalize(config, fitted_pixels(config, img))


def to_model_input(config: MatMambaVisionConfig, images: ModelInput) -> Tensor:
    """PIL image(s) or uint8 pixels ((c, h, w) or (n, c, h, w), tensor or array) -> model input (n, c, s, s).

    Float tensors are taken as model input already (checked for shape only)."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if isinstance(images, Tensor):
        x = images if images.ndim == 4 else images[None]
        if x.ndim != 4 or x.shape[1] not in (1, 3, config.in_chans):
            raise ValueError(f"pixels must be (n, c, h, w) or (c, h, w), got {tuple(images.shape)}")
        if x.is_floating_point():
            if tuple(x.shape[1:]) != (config.in_chans, config.img_size, config.img_size):
                raise ValueError(f"model input must be (n, {config.in_chans}, {config.img_size}, {config.img_size}), "
                                 f"got {tuple(images.shape)}")
            return x.float()
        if tuple(x.shape[1:]) == (config.in_chans, config.img_size, config.img_size):
            return _normalize(config, x)  # the arrays the model was trained on: normalised only, as in training
        arrays = x.cpu().numpy()
        images = [Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)) for a in arrays]
    images = list(images)
    if not images:
        raise ValueError("no images given")
    return torch.stack([_from_pil(config, img) for img in images])


# -- domain: does an image fit what the model was trained on? -------------------------------------------------------
_warned: set[str] = set()
_warned_lock = threading.Lock()


def domain_mismatch(config: MatMambaVisionConfig, img: Image.Image) -> str | None:
    """Why `img` does not fit the model (colour into a grey model, much larger than its input), or None."""
    problems = []
    if config.in_chans == 1 and _is_colour(img):
        problems.append("colour")
    width, height = original_size(img)
    if min(width, height) >= MUCH_LARGER * config.img_size:
        problems.append(f"{width}×{height} px")
    return " and ".join(problems) or None


def _is_colour(img: Image.Image) -> bool:
    if img.mode in ("1", "L", "LA", "La", "I", "I;16", "F"):
        return False
    small = flatten(img).convert("RGB")
    factor = min(small.size) // 32
    arr = np.asarray(small.reduce(factor) if factor >= 2 else small, dtype=np.float32)
    chroma = np.abs(arr[..., 0] - arr[..., 1]) + np.abs(arr[..., 1] - arr[..., 2])
    return float(chroma.mean()) > COLOUR_CHROMA


def domain_check(config: MatMambaVisionConfig, img: Image.Image) -> None:
    """Log a warning, once per model and run, the first time an image does not fit the model."""
    if config.name in _warned:
        return
    mismatch = domain_mismatch(config, img)
    if mismatch is None:
        return
    with _warned_lock:
        if config.name in _warned:
            return
        _warned.add(config.name)
    log.warning("warning: %s", domain_message(config, mismatch))


def domain_message(config: MatMambaVisionConfig, mismatch: str) -> str:
    return (f"the model {config.name} was trained on {config.describe_training()} images, and these images are "
            f"{mismatch}: its results will reflect little of what they show. Use a model trained on such images: "
            "`matsearch model list` shows the shipped models, `matsearch model import` brings in the paper's "
            "ImageNet checkpoints")


def reset_domain_warnings() -> None:
    """Forget which models were warned about (a new run in the same process)."""
    with _warned_lock:
        _warned.clear()
