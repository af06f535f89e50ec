"""The one image decoder: a file (path or bytes) -> the PIL image a person would see, at a size the model can use.

    img = decode_image(path_or_bytes, max_pixels=None, target_size=config.img_size)
    img.mode in ("L", "RGB"); original_size(img) == the size stored in the file
    is_blank(img)        # no content: one colour after compositing

Every decoder of the project is this one (index builds, queries, uploads, training, thumbnails), so an image
gives the same pixels on the index path and on the query path when both ask for the same target size.

What it does, in order:
- only the Pillow plugins of DECODE_FORMATS may open a file, whatever its name says (a renamed EPS must not
  reach Ghostscript);
- one pixel limit, checked on the header before anything is decoded: `max_pixels` (default DEFAULT_MAX_PIXELS,
  Pillow's own default). Raising it really admits larger images: this module applies the limit itself and
  switches Pillow's process-wide check off (see `_pillow_check_off`), so no second limit is ever reported;
- with `target_size`, reduced-size decoding: JPEG through Pillow's draft mode (libjpeg's DCT scaling by 1/2,
  1/4 or 1/8, chosen so both sides stay >= target_size), other formats by an integer box reduction
  (`Image.reduce`) straight after decoding, also keeping both sides >= target_size;
- EXIF orientation applied, the first frame of an animation, and `flatten`: 'L' or 'RGB' with transparency
  composited on a background that contrasts with the visible colour (see `flatten`).

Memory: a JPEG decoded with a target size never holds more than its draft size (about width*height/64 pixels
for large photos). Formats without reduced decoding (PNG, WebP, TIFF, ...) hold their full raster while one image
is decoded — width*height*bands bytes, so at most max_pixels*4 bytes per decoding thread — and only the reduced
image afterwards, so queues and batches hold small images. A raised max_pixels therefore needs that much memory
per worker.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, ImageStat, UnidentifiedImageError

# Files a folder source picks up. netpbm (.ppm/.pgm) is in: torchvision's ImageFolder lists it, and Pillow's PPM
# plugin is a plain raster reader with no external tools.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
# Pillow plugins a file may be decoded with, whatever its extension says. (JPEG's opener also reads phone
# cameras' MPO files.)
DECODE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "GIF", "TIFF", "PPM")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS (1 GiB of 24-bit pixels / 3 / 4)
BLANK_STD = 2.0  # per-channel standard deviation (0-255 scale) below which an image shows one colour
ORIGINAL_SIZE = "matsearch_original_size"  # key in img.info: (width, height) stored in the file
_EXIF_ORIENTATION = 0x0112
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F")


class UnreadableImage(Exception):
    """An item that cannot be turned into an image; `reason` says why, in words fit for a report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _pillow_check_off() -> None:
    """Pillow checks its one process-wide MAX_IMAGE_PIXELS at open and again in several plugins, warning above it
    and failing at twice it; a per-call limit cannot follow it, and two limits would be reported. Every decode in
    this project goes through decode_image, which checks its own limit on the header first."""
    Image.MAX_IMAGE_PIXELS = None


_pillow_check_off()


def decode_image(source: bytes | bytearray | str | os.PathLike, max_pixels: int | None = None,
                 target_size: int | None = None) -> Image.Image:
    """Decode an image file (its path or its bytes) into an 'L' or 'RGB' PIL image, or raise UnreadableImage.

    max_pixels: images with more pixels (width*height as stored) are refused before decoding, as possible
        decompression bombs; default DEFAULT_MAX_PIXELS; 0 or a negative value: no limit.
    target_size: the side the caller will shrink the image to (a model's img_size): large images are decoded
        at reduced size, each side still >= target_size (JPEG draft mode; an integer box reduction for other
        formats). None: full size.
    The size stored in the file is `original_size(img)`.
    """
    data = _read(source)
    try:
        img = _open(data, max_pixels)
        stored = img.size
        if target_size and img.format == "JPEG":
            img.draft(None, (target_size, target_size))  # libjpeg decodes at 1/2, 1/4 or 1/8 scale
        img.load()  # decodes everything now, so a truncated file fails here and not later
        if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
        if target_size:
            img = _reduce(img, target_size)
        img = flatten(img)
    except UnreadableImage:
        raise
    except UnidentifiedImageError:
        raise UnreadableImage("not a recognised image (unknown or unsupported format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:  # damaged data
        raise UnreadableImage(f"corrupt or truncated image: {e}") from None
    img.info[ORIGINAL_SIZE] = stored
    return img


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, without decoding its pixels (read_header)."""
    format: str  # the Pillow plugin that opened it: "JPEG", "PNG", ...
    mode: str  # the mode it decodes to: "RGB", "L", "CMYK", ...
    width: int  # as stored (before EXIF orientation)
    height: int
    orientation: int  # EXIF orientation tag, 1 when absent (decode_image applies it)
    progressive: bool  # JPEG: progressive scans


def read_header(source: bytes | bytearray | str | os.PathLike, max_pixels: int | None = None) -> ImageHeader:
    """The header of an image file, checked as decode_image checks it before decoding (readable, a format of
    DECODE_FORMATS, within the pixel limit): the same UnreadableImage reasons. Decodes no pixels."""
    data = _read(source)
    try:
        img = _open(data, max_pixels)
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        return ImageHeader(img.format, img.mode, img.width, img.height, int(orientation),
                           bool(img.info.get("progressive") or img.info.get("progression")))
    except UnreadableImage:
        raise
    except UnidentifiedImageError:
        raise UnreadableImage("not a recognised image (unknown or unsupported format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"corrupt or truncated image: {e}") from None


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    """Open (header only) and apply the pixel limit."""
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)  # reads the header only
    stored = img.size
    if limit > 0 and stored[0] * stored[1] > limit:  # before decoding: the header is all a bomb has to offer
        raise UnreadableImage(f"too many pixels ({stored[0]}x{stored[1]} = {stored[0] * stored[1]:,}, over the "
                              f"limit of {limit:,}): possible decompression bomb")
    return img


def jpeg_draft_scale(width: int, height: int, target_size: int) -> int:
    """The DCT scale divisor (1, 2, 4 or 8) decode_image's draft mode decodes a width x height JPEG at for
    `target_size` (Pillow's rule: the largest that keeps both sides >= target_size); the decoded size is
    (ceil(width / scale), ceil(height / scale))."""
    fit = min(width // target_size, height // target_size)
    return next((s for s in (8, 4, 2, 1) if fit >= s), 1)


def reduce_factor(width: int, height: int, target_size: int) -> int:
    """The integer box reduction decode_image applies after decoding a width x height image (1: none)."""
    factor = min(width, height) // target_size
    return factor if factor >= 2 else 1


def _read(source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise UnreadableImage(f"cannot read file: {e.strerror or e}") from None
    if not data:
        raise UnreadableImage("empty file (0 bytes)")
    return data


def _reduce(img: Image.Image, target_size: int) -> Image.Image:
    """Shrink by the largest integer factor that keeps both sides >= target_size (box filter: every pixel counts)."""
    factor = reduce_factor(img.width, img.height, target_size)
    if factor == 1:
        return img
    if img.mode not in _REDUCIBLE:  # palettes, 1-bit, 16-bit: to a mode whose pixels can be averaged first
        img = flatten(img)
    return img.reduce(factor)


def original_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as stored in the file decode_image read; the image's own size for other images."""
    return tuple(img.info.get(ORIGINAL_SIZE, img.size))


def flatten(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit 'L' (grey content) or 'RGB': what a person sees.

    Animations give their first frame; palettes are expanded; 16/32-bit integer and float images are rescaled to
    their own range; CMYK, LAB and the rest convert through Pillow. Transparency is composited on black or on
    white, whichever contrasts with the colour of the visible pixels (alpha-weighted mean luminance above
    mid-grey: black). Some images keep their whole picture in the alpha channel over one constant colour: on a
    background of that colour they would come out blank, on the contrasting one they show their picture.
    """
    if getattr(img, "is_animated", False) and img.tell() != 0:
        img.seek(0)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.round(arr).astype(np.uint8), mode="L")
    grey = img.mode in ("1", "L", "LA", "La")
    if img.mode in ("P", "L", "1") and "transparency" in img.info:
        img = img.convert("RGBA")
    elif img.mode == "P":
        img = img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = (0, 0, 0, 255) if _visible_luminance(rgba) > 127.5 else (255, 255, 255, 255)
        img = Image.alpha_composite(Image.new("RGBA", img.size, background), rgba)
        return img.convert("L" if grey else "RGB")
    if img.mode in ("L", "RGB"):
        return img
    return img.convert("L" if img.mode in ("1", "I;16", "F") else "RGB")


def _visible_luminance(rgba: Image.Image) -> float:
    """Alpha-weighted mean luminance (0-255) of an RGBA image's pixels (of a reduced copy of a large one);
    0 when nothing is visible."""
    factor = min(rgba.size) // 128
    small = rgba.reduce(factor) if factor >= 2 else rgba
    arr = np.asarray(small, dtype=np.float32)
    alpha = arr[..., 3] / 255.0
    total = float(alpha.sum())
    if total <= 0:
        return 0.0  # fully transparent: white background, as an empty page
    luminance = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    return float((luminance * alpha).sum() / total)


def is_blank(image: Image.Image | np.ndarray) -> bool:
    """True if an image shows one colour: every channel's standard deviation below BLANK_STD.

    `image` is what decode_image / flatten give ('L' or 'RGB'), or a uint8 array (c, h, w) such as a
    Fashion-MNIST item."""
    if isinstance(image, np.ndarray):
        arr = image.reshape(image.shape[0], -1).astype(np.float32) if image.ndim == 3 else image.astype(np.float32)
        return bool((arr.std(axis=-1) < BLANK_STD).all())
    return all(s < BLANK_STD for s in ImageStat.Stat(flatten(image)).stddev)
