"""Image sources for indexing, named by a SOURCE string, and robust decoding of what they hold.

    fashion-mnist:train | fashion-mnist:test   the Fashion-MNIST arrays; keys "fashion-mnist:test/000123"
    imagefolder:DIR                            torchvision ImageFolder tree: DIR/<class>/**/<image>, labelled
    DIR (or folder:DIR)                        any folder tree of images, recursive, unlabelled

Items come in a sorted, deterministic order (index shards depend on it). A file that cannot be decoded is
reported as `UnreadableImage(reason)`, so a build can skip it and say why instead of aborting.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Pillow plugins a file may be decoded with, whatever its extension says. Restricting them keeps, e.g., a
# renamed EPS file from being handed to Ghostscript. (JPEG's opener also reads phone cameras' MPO files.)
DECODE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "GIF", "TIFF")
FASHION_MNIST_PREFIX = "fashion-mnist:"
IMAGEFOLDER_PREFIX = "imagefolder:"
FOLDER_PREFIX = "folder:"


class UnreadableImage(Exception):
    """An item that cannot be turned into an image; `reason` says why, in words fit for a report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, eq=False)
class SourceItem:
    key: str  # unique within its source: a relative POSIX path, or "fashion-mnist:SPLIT/NNNNNN"
    label: int | None = None  # index into the source's label_names
    label_name: str | None = None
    path: Path | None = None  # file-backed items
    array: np.ndarray | None = None  # array-backed items: uint8 (c, h, w)


@dataclass(frozen=True, eq=False)
class ImageSource:
    spec: str  # canonical SOURCE string (absolute folder path): stored with every indexed item
    items: tuple[SourceItem, ...]
    label_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.items)


@dataclass(eq=False)
class LoadedImage:
    sha256: str  # of the file's bytes, or of the array's bytes
    width: int  # original size, as stored
    height: int
    image: Image.Image | None = None  # fully decoded (file-backed items)
    array: np.ndarray | None = None  # array-backed items


# -- sources -------------------------------------------------------------------------------------------------------
def open_source(spec: str, limit: int | None = None) -> ImageSource:
    """The items a SOURCE string names, the first `limit` of them if given (for quick runs and tests)."""
    spec = str(spec)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if spec.startswith(FASHION_MNIST_PREFIX):
        return _fashion_mnist_source(spec[len(FASHION_MNIST_PREFIX):], limit)
    if spec.startswith(IMAGEFOLDER_PREFIX):
        return _imagefolder_source(Path(spec[len(IMAGEFOLDER_PREFIX):]), limit)
    return _folder_source(Path(spec[len(FOLDER_PREFIX):] if spec.startswith(FOLDER_PREFIX) else spec), limit)


@functools.lru_cache(maxsize=2)
def _fashion_mnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    from vision_model.datasets import SPLITS, load_fashion_mnist

    if split not in SPLITS:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}: use fashion-mnist:train or fashion-mnist:test")
    images, labels = load_fashion_mnist(split)
    images, labels = images.numpy(), labels.numpy()
    images.flags.writeable = False  # shared by every caller through the cache
    return images, labels


def _fashion_mnist_source(split: str, limit: int | None) -> ImageSource:
    from vision_model.config import FASHION_MNIST_CLASSES

    images, labels = _fashion_mnist_arrays(split)
    n = len(images) if limit is None else min(limit, len(images))
    items = tuple(
        SourceItem(key=f"{FASHION_MNIST_PREFIX}{split}/{i:06d}", label=int(labels[i]),
                   label_name=FASHION_MNIST_CLASSES[labels[i]], array=images[i])
        for i in range(n))
    return ImageSource(f"{FASHION_MNIST_PREFIX}{split}", items, tuple(FASHION_MNIST_CLASSES))


def _require_dir(folder: Path) -> Path:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder")
    return folder.resolve()


def _image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted by their relative POSIX path."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        seen.add(os.path.realpath(dirpath))
        dirnames[:] = [d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in seen]  # link loops
        found.extend(Path(dirpath, name) for name in filenames if name.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _folder_source(folder: Path, limit: int | None) -> ImageSource:
    folder = _require_dir(folder)
    files = _image_files(folder)[:limit]
    items = tuple(SourceItem(key=p.relative_to(folder).as_posix(), path=p) for p in files)
    return ImageSource(str(folder), items)


def _imagefolder_source(folder: Path, limit: int | None) -> ImageSource:
    folder = _require_dir(folder)
    # as torchvision's ImageFolder.find_classes: every immediate subfolder is a class, indexed in sorted order
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"{folder} has no class subfolders: an ImageFolder tree is DIR/<class>/<image>")
    items = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        items.extend(SourceItem(key=p.relative_to(folder).as_posix(), label=label, label_name=name, path=p)
                     for p in _image_files(class_dir))
    return ImageSource(f"{IMAGEFOLDER_PREFIX}{folder}", tuple(items[:limit]), tuple(classes))


# -- decoding ------------------------------------------------------------------------------------------------------
def decode_image(data: bytes, max_pixels: int | None = None, target_size: int | None = None) -> Image.Image:
    """Decode an encoded image, or raise UnreadableImage. Modes are left as they are (see to_mode).

    target_size: a hint that the image will be resized to about target_size pixels on its short side. A JPEG is
    then decoded at the smallest DCT scale (1/2, 1/4, 1/8: Pillow's draft mode) that keeps both sides at least
    target_size, which skips most of the decoding work for a photo; other formats decode fully. The image's
    `original_size` attribute is its stored size either way."""
    if not data:
        raise UnreadableImage("empty file (0 bytes)")
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    try:
        img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)  # reads the header only
        if limit and img.width * img.height > limit:  # before decoding: the header is all a bomb has to offer
            raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels")
        original_size = img.size
        if target_size and img.format == "JPEG":
            img.draft(None, (target_size, target_size))
        img.load()
        img.original_size = original_size  # decodes everything, so a truncated file fails here and not later
        return img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableImage(f"too many pixels, possible decompression bomb (limit {limit} pixels): {e}") from None
    except UnidentifiedImageError:
        raise UnreadableImage("not a recognised image (unknown or unsupported format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # what Pillow's decoders raise on damaged data
        raise UnreadableImage(f"corrupt or truncated image: {e}") from None


@dataclass(eq=False)
class RawItem:
    sha256: str  # of the file's bytes, or of the array's bytes
    data: bytes | None = None  # file-backed items: the encoded file
    array: np.ndarray | None = None  # array-backed items


def read_item(item: SourceItem) -> RawItem:
    """An item's bytes and content hash, without decoding (enough to tell whether it is already indexed)."""
    if item.array is not None:
        arr = np.ascontiguousarray(item.array)
        return RawItem(hashlib.sha256(arr.tobytes()).hexdigest(), array=arr)
    try:
        data = item.path.read_bytes()
    except OSError as e:
        raise UnreadableImage(f"cannot read file: {e.strerror or e}") from None
    return RawItem(hashlib.sha256(data).hexdigest(), data=data)


def decode_item(raw: RawItem, max_pixels: int | None = None, target_size: int | None = None) -> LoadedImage:
    """A read item decoded (see decode_image for target_size); width and height are the stored size."""
    if raw.array is not None:
        return LoadedImage(raw.sha256, raw.array.shape[-1], raw.array.shape[-2], array=raw.array)
    img = decode_image(raw.data, max_pixels, target_size)
    width, height = img.original_size
    return LoadedImage(raw.sha256, width, height, image=img)


def load_item(item: SourceItem, max_pixels: int | None = None) -> LoadedImage:
    """Read and decode one item, hashing its content; raise UnreadableImage if it cannot be used."""
    return decode_item(read_item(item), max_pixels)


def load_image(source_spec: str, key: str) -> Image.Image:
    """The image an index row names (its `source` and `key` columns), for display."""
    if source_spec.startswith(FASHION_MNIST_PREFIX):
        split, _, number = key[len(FASHION_MNIST_PREFIX):].partition("/")
        images, _ = _fashion_mnist_arrays(split)
        return Image.fromarray(images[int(number), 0])
    root = source_spec[len(IMAGEFOLDER_PREFIX):] if source_spec.startswith(IMAGEFOLDER_PREFIX) else source_spec
    root = root[len(FOLDER_PREFIX):] if root.startswith(FOLDER_PREFIX) else root
    path = Path(root, key)
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise ValueError(f"key {key!r} points outside its source folder {root}")
    return decode_image(path.read_bytes())
