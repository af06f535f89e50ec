"""JPEGs decoded in batches on the encoder's device, then preprocessed there: an index build's `--decode gpu`.

    eligible(header, data) -> bool              a worker's check: this JPEG may skip CPU decoding
    decoder = JpegBatchDecoder(config, device)  decoder.decode(jobs) -> DecodedJpegs (uint8 model pixels on device)

The workers still read, hash and check each file's header (vision_model.images.read_header: the same refusals
as the CPU path), and ship an eligible JPEG's bytes instead of its pixels. The main process decodes a batch with
`torchvision.io.decode_jpeg(list, device=...)`: nvJPEG on CUDA (the hardware JPEG engine for baseline JPEGs on
A100/H100/H200, Huffman decoding included; progressive JPEGs stay on the CPU path, see PROGRESSIVE_ON_DEVICE);
torchvision's CPU decoder on a CPU device, which runs the same code in tests.

The pixels follow the CPU path's geometry: the CPU path decodes a JPEG in libjpeg's draft mode at 1/s scale
(vision_model.images.jpeg_draft_scale), which averages each s x s block; here the full-size image is averaged over
the same blocks (avg_pool2d, partial blocks at the edges averaged over what they hold), then EXIF orientation, the
integer box reduction, the model's channels and the fit (vision_model.preprocess.fitted_pixels_batch) as on the
CPU. The two differ by the decoders' rounding (block means of a full decode vs scaled IDCTs, chroma upsampling):
a few grey levels per pixel, measured in benchmarks/gpu/index_pipeline.py.

A file the device decoder rejects (an exception, an unexpected size) is decoded by the CPU decoder
(vision_model.images.decode_image) instead; one the CPU decoder rejects too comes back in `failed`, with the
reason, to be reported as skipped. Memory: each decode_jpeg call holds at most CALL_PIXELS stored pixels of
full-size RGB output (and its float copy while averaging); larger JPEGs than GPU_MAX_PIXELS never come here.
"""
from __future__ import annotations

import functools
import io
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vision_model.images import (BLANK_STD, ORIGINAL_SIZE, ImageHeader, UnreadableImage, decode_image, is_blank,
                                 jpeg_draft_scale, reduce_factor)
from vision_model.preprocess import decode_size, domain_check, fitted_pixels, fitted_pixels_batch

log = logging.getLogger(__name__)

GPU_MAX_PIXELS = 50_000_000  # larger JPEGs are decoded by the workers (draft mode): device memory stays bounded
CALL_PIXELS = 400_000_000  # stored pixels per decode_jpeg call: 1.2 GB of RGB output; fewer, larger calls
STACK_PIXELS = 64_000_000  # stored pixels averaged at once: 770 MB as float32
CPU_THREADS = 8  # threads decoding the device decoder's rejects (Pillow releases the GIL while decoding)
# Progressive JPEGs stay with the worker processes: nvJPEG's hardware engine takes baseline JPEGs only, and
# torchvision hands the others to nvJPEG's hybrid decoder one at a time, Huffman-decoding on the host in the calling
# thread under one process-wide lock, a full-size decode that costs more host time than the workers' draft decode and
# is not spread over cores (benchmarks/gpu/index_pipeline.py measures both).
PROGRESSIVE_ON_DEVICE = False
# GPUs whose nvJPEG has the hardware JPEG engine (A100/A30, H100/H200, B200): elsewhere every JPEG would take the
# hybrid path above, so `--decode auto` keeps the CPU path there
HARDWARE_JPEG_CAPABILITIES = ((8, 0), (9, 0), (10, 0))
_MARKER_SOS, _MARKER_EOI = b"\xff\xda", b"\xff\xd9"


def eligible(header: ImageHeader, data: bytes, max_pixels: int = GPU_MAX_PIXELS,
             progressive: bool = PROGRESSIVE_ON_DEVICE) -> bool:
    """Whether a file (its checked header and bytes) goes to the device decoder: a JPEG (not MPO) of 'L' or 'RGB'
    content (CMYK/YCCK stay on the CPU), at most `max_pixels`, baseline unless `progressive`, whose last scan is
    followed by an end-of-image marker. The last condition sends truncated files to the CPU decoder, which refuses
    them as the CPU path does; nvJPEG would decode what is there."""
    if header.format != "JPEG" or header.mode not in ("L", "RGB") or header.width * header.height > max_pixels:
        return False
    if header.progressive and not progressive:
        return False
    return data.rfind(_MARKER_EOI) > data.rfind(_MARKER_SOS) >= 0


def without_trailer(data: bytes) -> bytes:
    """An eligible JPEG's bytes up to its end-of-image marker: what follows (camera trailers, an appended video,
    padding) is ignored by decoders, so it need not travel to the device decoder."""
    return data[:data.rfind(_MARKER_EOI) + 2]


def hardware_engine(device: torch.device | str) -> bool:
    """Whether `device` is a GPU with a hardware JPEG engine nvJPEG uses (by compute capability)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) in HARDWARE_JPEG_CAPABILITIES


@functools.lru_cache(maxsize=4)
def unavailable_reason(device: torch.device | str) -> str | None:
    """Why torchvision's decode_jpeg cannot decode on `device` here (CUDA: built without nvJPEG, no library, ...),
    or None when it can: a 16x16 JPEG is decoded to find out."""
    try:
        from PIL import Image
        from torchvision.io import ImageReadMode, decode_jpeg

        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (10, 200, 30)).save(buffer, "JPEG")
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        out = decode_jpeg([data], device=str(device), mode=ImageReadMode.RGB)
        return None if tuple(out[0].shape) == (3, 16, 16) else f"unexpected output shape {tuple(out[0].shape)}"
    except Exception as e:  # noqa: BLE001 - any failure means "no"
        return f"{type(e).__name__}: {e}"


def available(device: torch.device | str) -> bool:
    """Whether torchvision's decode_jpeg decodes on `device` (CUDA: built with nvJPEG and working here)."""
    reason = unavailable_reason(str(device))
    if reason is not None:
        log.info("batched JPEG decoding on %s is not available: %s", device, reason)
    return reason is None


@dataclass
class JpegJob:
    """One JPEG of a batch: its slot in the batch, its bytes, what its header said."""
    slot: int
    data: torch.Tensor  # uint8 (n_bytes,), CPU
    width: int  # as stored
    height: int
    orientation: int = 1  # EXIF orientation
    entry: dict | None = None  # the build's metadata row for the item (its `blank` is filled in later)


@dataclass
class DecodedJpegs:
    pixels: torch.Tensor  # uint8 (n, c, s, s) on the device, one per job, in order (failed ones: zeros)
    blank: torch.Tensor  # bool (n,) on the device: no content (vision_model.images.is_blank)
    fallback: int = 0  # jobs the device decoder rejected and the CPU decoder decoded
    failed: dict[int, str] = field(default_factory=dict)  # job index -> why neither decoder could decode it


def _orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """PIL.ImageOps.exif_transpose on (n, c, h, w)."""
    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-2, -1)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(x, -1, (-2, -1))
    if orientation == 7:
        return x.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(x, 1, (-2, -1))
    return x


def _box(x: torch.Tensor, factor: int) -> torch.Tensor:
    """uint8 (n, c, h, w) averaged over factor x factor blocks (partial blocks: over the pixels they hold),
    rounded: Pillow's Image.reduce, and libjpeg's 1/factor DCT scaling up to the decoders' rounding."""
    if factor == 1:
        return x
    return F.avg_pool2d(x.float(), factor, factor, ceil_mode=True).round_().to(torch.uint8)


class JpegBatchDecoder:
    """Decodes batches of JPEGs on `device` into the model's uint8 pixels (see the module's docstring)."""

    def __init__(self, config, device: torch.device | str, max_pixels: int | None = None):
        self.config, self.device, self.max_pixels = config, torch.device(device), max_pixels
        self.target = decode_size(config)
        self._domain_checked = False

    def decode(self, jobs: list[JpegJob]) -> DecodedJpegs:
        c, s = self.config.in_chans, self.config.img_size
        pixels = torch.zeros((len(jobs), c, s, s), dtype=torch.uint8, device=self.device)
        blank = torch.zeros(len(jobs), dtype=torch.bool, device=self.device)
        result = DecodedJpegs(pixels, blank)
        call, pixels_in_call = [], 0
        for i, job in enumerate(jobs):
            if call and pixels_in_call + job.width * job.height > CALL_PIXELS:
                self._decode_call(jobs, call, result)
                call, pixels_in_call = [], 0
            call.append(i)
            pixels_in_call += job.width * job.height
        if call:
            self._decode_call(jobs, call, result)
        return result

    def _settle(self) -> None:
        """Wait for this call's kernels: the next call's decoder writes its outputs on nvJPEG's own stream, into
        memory this call's freed full-size images may have held."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _decode_call(self, jobs: list[JpegJob], indexes: list[int], result: DecodedJpegs) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            images = decode_jpeg([jobs[i].data for i in indexes], device=self.device, mode=ImageReadMode.RGB)
        except Exception:  # one bad file fails the whole call: decode one by one to find it
            images = []
            for i in indexes:
                try:
                    images.append(decode_jpeg(jobs[i].data, device=self.device, mode=ImageReadMode.RGB))
                except Exception as e:  # noqa: BLE001 - handed to the CPU decoder
                    log.info("device decoder rejected a JPEG (%s): decoding it on the CPU", e)
                    images.append(None)
        decoded = dict(zip(indexes, images))
        del images
        groups: dict[tuple, list[int]] = {}
        rejected = []
        for i in indexes:
            job, image = jobs[i], decoded[i]
            if image is None or tuple(image.shape) != (3, job.height, job.width):
                rejected.append(i)
                continue
            groups.setdefault((job.height, job.width, job.orientation), []).append(i)
        for (height, width, orientation), members in groups.items():
            step = max(1, STACK_PIXELS // (height * width))
            for at in range(0, len(members), step):
                part = members[at:at + step]
                x = torch.stack([decoded[i] for i in part])
                for i in part:
                    decoded[i] = None  # the full-size images go as soon as they are stacked
                self._preprocess(x, part, width, height, orientation, result)
        self._settle()
        if rejected:
            self._on_cpu([(i, jobs[i]) for i in rejected], result)

    def _preprocess(self, x: torch.Tensor, part: list[int], width: int, height: int, orientation: int,
                    result: DecodedJpegs) -> None:
        """Full-size decoded images of one stored size and orientation -> their model pixels and blank flags."""
        x = _box(x, jpeg_draft_scale(width, height, self.target))
        x = _orient(x, orientation)
        x = _box(x, reduce_factor(x.shape[-1], x.shape[-2], self.target))
        where = torch.tensor(part, device=self.device)  # synchronises the decoder's stream only
        std = x.flatten(2).float().std(-1, unbiased=False)
        result.blank.index_copy_(0, where, (std < BLANK_STD).all(-1))
        if not self._domain_checked:  # the CPU path's one-time warning (colour into a grey model, ...)
            self._domain_checked = True
            self._check_domain(x[0], width, height)
        result.pixels.index_copy_(0, where, fitted_pixels_batch(self.config, x))

    def _on_cpu(self, rejected: list[tuple[int, JpegJob]], result: DecodedJpegs) -> None:
        """Decode the device decoder's rejects with the CPU path's decoder, in threads."""
        from concurrent.futures import ThreadPoolExecutor

        def one(job: JpegJob):
            try:
                img = decode_image(job.data.numpy().tobytes(), self.max_pixels, self.target)
                return fitted_pixels(self.config, img), is_blank(img), None
            except UnreadableImage as e:
                return None, False, e.reason
            except Exception as e:  # noqa: BLE001 - as prepare_item: the build goes on
                return None, False, f"cannot decode or preprocess: {type(e).__name__}: {e}"

        with ThreadPoolExecutor(min(CPU_THREADS, len(rejected))) as pool:
            outcomes = list(pool.map(one, [job for _, job in rejected]))
        for (i, _), (pixels, blank, reason) in zip(rejected, outcomes):
            if reason is not None:
                result.failed[i] = reason
                continue
            result.pixels[i] = pixels.to(self.device)
            result.blank[i] = blank
            result.fallback += 1

    def _check_domain(self, x: torch.Tensor, width: int, height: int) -> None:
        from PIL import Image

        array = x.permute(1, 2, 0).cpu().numpy()  # once per build: one small copy
        img = Image.fromarray(array)
        img.info[ORIGINAL_SIZE] = (width, height)
        domain_check(self.config, img)
