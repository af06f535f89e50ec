"""Augmentation of whole batches on the device (GPU or CPU): the views a self-supervised step compares.

    spec = ViewSpec(size=96, scale=(0.25, 1.0))
    views = augment(uint8_batch, spec, torch.Generator().manual_seed(step))   # (b, c, 96, 96) float in [0, 1]

Every random parameter is drawn on the CPU from the generator passed (a few numbers per image), then the
pixels are transformed with batched torch ops where the batch lives, so a step's views depend only on its seed.
The chain, each stage applied to a random subset of the batch: random resized crop + horizontal flip (one
bilinear `grid_sample` per batch), colour jitter (brightness, contrast, saturation, hue as a rotation of the
YIQ chroma plane), greyscale, Gaussian blur (a per-image separable kernel, grouped convolution) and JPEG-like
compression (8x8 block DCT of YCbCr with the standard quantisation tables at a random quality, 4:2:0 chroma).
Crops, flips, brightness and recompression are what copy detection must be invariant to; the colour and blur
stages keep the contrastive task from being solved by colour histograms (SimCLR, Chen et al. 2020).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ViewSpec:
    size: int  # output side in pixels
    scale: tuple[float, float] = (0.25, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio (w / h)
    flip: float = 0.5
    jitter: float = 0.8  # probability of colour jitter
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # fraction of a full turn
    grey: float = 0.2
    blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.5)  # in output pixels
    jpeg: float = 0.3
    jpeg_quality: tuple[int, int] = (20, 90)


def _uniform(b: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    return torch.rand(b, generator=gen) * (hi - lo) + lo


def _chance(b: int, p: float, gen: torch.Generator) -> Tensor:
    return torch.rand(b, generator=gen) < p


def resized_crop(x: Tensor, size: int, scale, ratio, flip: float, gen: torch.Generator) -> Tensor:
    """Random boxes of `scale` of the area and aspect `ratio`, flipped with probability `flip`, resampled to
    size x size (bilinear, border padding; a box never leaves the image)."""
    b = x.shape[0]
    area = _uniform(b, *scale, gen)
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), gen)
    w = torch.sqrt(area * log_r.exp()).clamp(max=1.0)  # fractions of the side
    h = torch.sqrt(area / log_r.exp()).clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates, box inside the image
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
    sign = torch.where(_chance(b, flip, gen), -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grey(x: Tensor) -> Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if x.shape[1] == 3 else x


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def colour_jitter(x: Tensor, spec: ViewSpec, gen: torch.Generator) -> Tensor:
    """Brightness, contrast, saturation (and hue for colour images) factors, in that order, on a random subset."""
    b, dev = x.shape[0], x.device
    on = _chance(b, spec.jitter, gen)
    factor = lambda amount: torch.where(on, _uniform(b, 1 - amount, 1 + amount, gen), 1.0).to(dev)[:, None, None, None]
    x = (x * factor(spec.brightness)).clamp(0, 1)
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * factor(spec.contrast) + mean).clamp(0, 1)
    if x.shape[1] == 3:
        g = _grey(x)
        x = ((x - g) * factor(spec.saturation) + g).clamp(0, 1)
        angle = torch.where(on, _uniform(b, -spec.hue, spec.hue, gen), 0.0) * 2 * math.pi
        cos, sin = angle.cos(), angle.sin()
        rot = torch.zeros(b, 3, 3)
        rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, cos, -sin, sin, cos
        to_yiq = _RGB_TO_YIQ
        m = (torch.linalg.inv(to_yiq) @ rot @ to_yiq).to(dev, x.dtype)  # rotate the chroma plane, keep luma
        x = torch.einsum("bij,bjhw->bihw", m, x).clamp(0, 1)
    return x


def gaussian_blur(x: Tensor, apply: Tensor, sigma: Tensor, radius: int = 4) -> Tensor:
    """Separable Gaussian blur with a per-image sigma (pixels); images where `apply` is False are unchanged."""
    b, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    identity = (t == 0).float().expand(b, -1)
    kernel = torch.where(apply[:, None], kernel, identity).to(x.device, x.dtype)
    k = kernel.repeat_interleave(c, 0)  # (b*c, 2r+1)
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


_LUMA_Q = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)
_CHROMA_Q = torch.full((8, 8), 99.0)
_CHROMA_Q[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]])


def _dct_matrix(n: int = 8) -> Tensor:
    k, i = torch.arange(n, dtype=torch.float64)[:, None], torch.arange(n, dtype=torch.float64)[None]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m.float()


def _quantise_blocks(plane: Tensor, table: Tensor, dct: Tensor) -> Tensor:
    """plane (b, h, w) in 0..255 (h, w multiples of 8); table (b, 8, 8): DCT, round to the table, inverse."""
    b, h, w = plane.shape
    blocks = (plane - 128).reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    coeffs = dct @ blocks @ dct.T
    q = table[:, None, None]
    blocks = dct.T @ (torch.round(coeffs / q) * q) @ dct
    return blocks.permute(0, 1, 3, 2, 4).reshape(b, h, w) + 128


def jpeg_like(x: Tensor, quality: Tensor) -> Tensor:
    """JPEG's lossy steps on images in [0, 1]: YCbCr, 4:2:0 chroma, 8x8 DCT quantised with the standard tables
    scaled for `quality` (1..100, per image). Sides that are not multiples of 16 are edge-padded and cropped back."""
    b, c, h, w = x.shape
    ph, pw = -h % 16, -w % 16
    y = F.pad(x, (0, pw, 0, ph), mode="replicate") * 255 if ph or pw else x * 255
    scale = torch.where(quality < 50, 5000 / quality, 200 - 2 * quality)
    table = lambda base: ((base[None] * scale[:, None, None] + 50) / 100).floor().clamp(1, 255).to(x.device)
    dct = _dct_matrix().to(x.device)
    if c == 1:
        return (_quantise_blocks(y[:, 0], table(_LUMA_Q), dct)[:, None, :h, :w] / 255).clamp(0, 1)
    r, g, bl = y[:, 0], y[:, 1], y[:, 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * bl
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * bl
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * bl
    luma = _quantise_blocks(luma, table(_LUMA_Q), dct)
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)  # 4:2:0
    cq = table(_CHROMA_Q)
    chroma = torch.stack([_quantise_blocks(chroma[:, i], cq, dct) for i in range(2)], 1)
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False) - 128
    cb, cr = chroma[:, 0], chroma[:, 1]
    rgb = torch.stack([luma + 1.402 * cr, luma - 0.344136 * cb - 0.714136 * cr, luma + 1.772 * cb], 1)
    return (rgb[:, :, :h, :w] / 255).clamp(0, 1)


def augment(x: Tensor, spec: ViewSpec, gen: torch.Generator) -> Tensor:
    """uint8 (b, c, H, W) on any device -> one augmented view per image, float32 (b, c, size, size) in [0, 1]."""
    b = x.shape[0]
    x = resized_crop(x.float() / 255, spec.size, spec.scale, spec.ratio, spec.flip, gen)
    x = colour_jitter(x, spec, gen)
    grey = _chance(b, spec.grey, gen).to(x.device)[:, None, None, None]
    x = torch.where(grey, _grey(x).expand_as(x), x)
    x = gaussian_blur(x, _chance(b, spec.blur, gen), _uniform(b, *spec.blur_sigma, gen))
    on = _chance(b, spec.jpeg, gen).to(x.device)[:, None, None, None]
    quality = _uniform(b, *spec.jpeg_quality, gen).round()
    return torch.where(on, jpeg_like(x, quality), x) if spec.jpeg > 0 else x
