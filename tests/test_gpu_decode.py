"""`index build --decode gpu` on the CPU: the workers ship JPEG bytes, the main process decodes them in batches with
torchvision's decoder on the encoder's device (here the CPU; nvJPEG on CUDA runs the same code) and preprocesses them
there. Against the CPU path (Pillow draft decoding in the workers) on real files made here: the same items indexed
and skipped, vectors within tolerance, the same neighbours, resumable, its own plan."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

import vision_model
from index import IndexStore, build_index
from index.jpeg_batch import JpegBatchDecoder, JpegJob
from index.pipeline import prepare_item
from index.sources import SourceItem
from vision_model.images import read_header

# Both decoders round differently (block means of a full decode against libjpeg's scaled IDCT): a few grey levels
# on average, more at sharp edges. Tolerances for these smooth test images, measured at 0.6 / 15 on the CPU.
MEAN_ABS_PIXELS = 1.5
MAX_ABS_PIXELS = 40
MIN_COSINE = 0.99
MIN_RECALL_AT_10 = 0.99
SIZES = [(64, 48), (200, 150), (333, 250), (640, 480), (97, 211), (1000, 750)]


def _scene(seed: int, width: int, height: int) -> Image.Image:
    """A smooth photo-like picture: a blurred colour field with a few shapes."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((width, height),
                                                                                   Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x0, y0, x0 + width // 3, y0 + height // 3), fill=colour)
    return img.filter(ImageFilter.GaussianBlur(1))


def _corrupt_entropy_data(data: bytes) -> bytes:
    """A JPEG whose header is fine and which ends with EOI, but whose scan data is broken: both decoders refuse it."""
    out = bytearray(data)
    for k in range(data.rfind(b"\xff\xda") + 40, len(out) - 10, 97):
        out[k] = 0xFF if out[k] != 0xFF else 0x00
    return bytes(out)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i in range(36):
        width, height = SIZES[i % len(SIZES)]
        _scene(i, width, height).save(root / f"p{i:02d}.jpg", quality=90, progressive=i % 7 == 3)
    rotated = _scene(90, 300, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    rotated.save(root / "rotated.jpg", exif=exif)
    _scene(91, 120, 90).convert("L").save(root / "grey.jpg")
    _scene(92, 160, 120).save(root / "subsampling444.jpg", subsampling=0)
    rng = np.random.default_rng(0)
    Image.frombytes("CMYK", (40, 30), rng.integers(0, 256, (30, 40, 4), dtype=np.uint8).tobytes()).save(
        root / "cmyk.jpg")
    (root / "trailer.jpg").write_bytes((root / "p05.jpg").read_bytes() + b"12345678")  # bytes after EOI
    good = (root / "p00.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "broken.jpg").write_bytes(_corrupt_entropy_data((root / "p01.jpg").read_bytes()))
    (root / "garbage.jpg").write_bytes(b"not a jpeg at all")
    _scene(93, 80, 60).save(root / "mixed-in.png")
    return root


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory) -> Path:
    """A small random colour model, centre-cropped (resize 40, crop 32), weights spread so images differ."""
    torch.manual_seed(0)
    model = vision_model.create_model("matmamba_vision_35m", depth=2, d_model=64, d_state=16, headdim=16,
                                      img_size=32, resize_size=40, patch_size=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.1)
    return vision_model.save_pretrained(model, tmp_path_factory.mktemp("model"), dtype=None)


def _build(source, out, model_dir, decode, **kwargs):
    kwargs = {"progress": False, "workers": 0, "device": "cpu", "batch_size": 8, "shard_size": 16, **kwargs}
    return build_index(str(source), out, model_dir=model_dir, decode=decode, **kwargs)


def _recall_at_10(reference: np.ndarray, other: np.ndarray) -> float:
    def top(v):
        sims = v @ v.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :10]
    a, b = top(reference), top(other)
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)]))


@pytest.fixture(scope="module")
def both(photos, colour_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("indexes")
    cpu = _build(photos, out / "cpu", colour_model, "cpu", workers=2)
    gpu = _build(photos, out / "gpu", colour_model, "gpu", workers=2)  # the JPEGs' bytes cross processes
    return cpu, gpu, IndexStore.open(out / "cpu", device="cpu"), IndexStore.open(out / "gpu", device="cpu")


def test_gpu_path_indexes_and_skips_what_the_cpu_path_does(both):
    cpu, gpu, a, b = both
    rows_a, rows_b = a.metadata(np.arange(len(a))), b.metadata(np.arange(len(b)))
    assert [r["key"] for r in rows_a] == [r["key"] for r in rows_b]
    assert rows_a == rows_b  # sha256, stored sizes, blank flags, sources
    assert len(a) == 36 + 6  # photos, trailer, rotated, grey, 4:4:4, CMYK (on the CPU), the PNG (on the CPU)
    assert cpu.manifest["skipped"] == gpu.manifest["skipped"]
    assert {s["key"] for s in gpu.skipped} == {"truncated.jpg", "broken.jpg", "garbage.jpg"}
    build = gpu.manifest["build"]
    assert build["decode"] == "gpu" and cpu.manifest["build"]["decode"] == "cpu"
    progressive = len([i for i in range(36) if i % 7 == 3])  # these stay with the workers, as CMYK and the PNG
    assert build["decoded_on_device"] == 36 - progressive + 4  # the baseline photos, trailer, rotated, grey, 4:4:4
    assert build["stage_seconds"]["gpu_decode"] > 0 and cpu.manifest["build"]["stage_seconds"]["gpu_decode"] == 0


def test_gpu_path_vectors_and_neighbours_match_the_cpu_path(both):
    _, _, a, b = both
    va, vb = np.asarray(a.vectors), np.asarray(b.vectors)
    assert (va @ va.T).min() < 0.9  # the model tells these images apart: the comparison means something
    assert (va * vb).sum(1).min() >= MIN_COSINE
    assert _recall_at_10(va, vb) >= MIN_RECALL_AT_10


@pytest.mark.parametrize("config", ["matmamba_vision_fmnist", "matmamba_vision_clipart", "centre"])
def test_device_decoder_pixels_follow_the_cpu_geometry(photos, config):
    """Grey dark-background padding (fmnist), colour padding (clipart), centre crop: model pixels within a few grey
    levels of the CPU path's for every size, progressive, EXIF-rotated and grey JPEG."""
    cfg = (vision_model.get_config("matmamba_vision_35m", img_size=48, resize_size=56) if config == "centre"
           else vision_model.get_config(config))
    decoder = JpegBatchDecoder(cfg, "cpu")
    names = [f"p{i:02d}.jpg" for i in range(12)] + ["rotated.jpg", "grey.jpg", "subsampling444.jpg"]
    jobs, expected = [], []
    for slot, name in enumerate(names):
        data = (photos / name).read_bytes()
        header = read_header(data)
        jobs.append(JpegJob(slot, torch.frombuffer(bytearray(data), dtype=torch.uint8), header.width, header.height,
                            header.orientation))
        expected.append(prepare_item(SourceItem(name, path=photos / name), cfg).pixels)
    decoded = decoder.decode(jobs)
    assert not decoded.failed and decoded.fallback == 0
    for name, got, want in zip(names, decoded.pixels, expected):
        assert got.shape == want.shape, name
        diff = (got.int() - want.int()).abs()
        assert diff.float().mean() <= MEAN_ABS_PIXELS and diff.max() <= MAX_ABS_PIXELS, name


def test_a_file_both_decoders_refuse_is_skipped_and_the_rest_of_its_batch_indexed(photos, tmp_path):
    decoder = JpegBatchDecoder(vision_model.get_config("matmamba_vision_clipart"), "cpu")
    jobs = []
    for slot, name in enumerate(["p02.jpg", "broken.jpg", "p03.jpg"]):
        data = (photos / name).read_bytes()
        header = read_header(data)
        jobs.append(JpegJob(slot, torch.frombuffer(bytearray(data), dtype=torch.uint8), header.width, header.height))
    decoded = decoder.decode(jobs)
    assert list(decoded.failed) == [1] and "corrupt" in decoded.failed[1]
    assert decoded.pixels[0].float().std() > 5 and decoded.pixels[2].float().std() > 5  # real pictures


def test_gpu_build_resumes_and_never_reuses_cpu_pieces(photos, colour_model, tmp_path, both):
    class Kill(Exception):
        pass

    def kill_after_one_shard(done: int, total: int) -> None:
        if done == 1:
            raise Kill

    out = tmp_path / "resumed"
    with pytest.raises(Kill):  # a CPU-decoded first shard, then killed
        _build(photos, out, colour_model, "cpu", on_shard=kill_after_one_shard)
    with pytest.raises(Kill):  # the GPU path does not reuse it: it starts over, and is killed after its own shard
        _build(photos, out, colour_model, "gpu", on_shard=kill_after_one_shard)
    resumed = _build(photos, out, colour_model, "gpu")
    assert resumed.manifest["build"]["resumed_shards"] == 1
    _, _, _, reference = both
    store = IndexStore.open(out, device="cpu")
    assert store.metadata(np.arange(len(store))) == reference.metadata(np.arange(len(reference)))
    assert np.array_equal(np.asarray(store.vectors), np.asarray(reference.vectors))  # as uninterrupted, bit for bit


def test_bad_decode_option_is_a_clear_error(photos, colour_model, tmp_path):
    with pytest.raises(ValueError, match="decode must be"):
        _build(photos, tmp_path / "x", colour_model, "nvjpeg")


def test_jpegs_over_the_device_pixel_limit_are_decoded_by_the_workers(photos):
    """The device path's memory stays bounded: a JPEG with more pixels than its limit comes back as pixels (the
    CPU path's draft decode), one within it as bytes for the device."""
    cfg = vision_model.get_config("matmamba_vision_clipart")
    item = SourceItem("p02.jpg", path=photos / "p02.jpg")  # baseline, 333 x 250 = 83,250 pixels
    over = prepare_item(item, cfg, device_decode=80_000)
    within = prepare_item(item, cfg, device_decode=90_000)
    assert over.jpeg is None and over.pixels is not None and over.pixels.shape == (3, 96, 96)
    assert within.jpeg is not None and within.pixels is None
    assert over.sha256 == within.sha256 and (within.width, within.height) == (333, 250)
