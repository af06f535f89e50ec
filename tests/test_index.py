"""The index package on real files, real FAISS and a small random model (CPU, a few seconds in all)."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
import struct
import zlib
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vision_model
from conftest import save_small_model
from index import CorruptIndexError, IndexStore, build_index, open_source
from index import build as build_module
from index import pipeline
from retrieval import knn
from vision_model.config import FASHION_MNIST_CLASSES
from vision_model.datasets import load_fashion_mnist
from vision_model.preprocess import to_model_input

PIXEL_LIMIT = 50_000  # lowered limit for the tests: big.png (300 x 300) is over it, every other image under
GOOD = ["a/nested/n0.png", "a/n1.jpg", "b0.png", "b1.jpeg", "b2.bmp", "b3.tiff", "b4.webp", "b5.png", "b6.jpg",
        "b7.png"]
ODD = ["odd/cmyk.jpg", "odd/gray16.png", "odd/palette.png", "odd/animated.gif", "odd/rgba.png"]
BAD = {"bad/empty.png": "empty file", "bad/truncated.jpg": "truncated", "bad/text.png": "not a recognised image",
       "bad/bomb.png": "decompression bomb", "bad/big.png": "decompression bomb"}


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return save_small_model(tmp_path_factory.mktemp("model"), seed=0)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    return save_small_model(tmp_path_factory.mktemp("other-model"), seed=1)


def _noise(seed: int, height: int, width: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _write_image(path: Path, seed: int) -> None:
    """A distinct random RGB image in the format the extension names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise(seed, 20 + seed % 17, 24 + seed % 13)).save(path)


def _png_claiming_size(width: int, height: int) -> bytes:
    """A valid little PNG whose header claims width x height pixels: a decompression bomb's calling card."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _write_odd_and_bad(root: Path) -> None:
    (root / "odd").mkdir(parents=True)
    Image.frombytes("CMYK", (23, 19), _noise(40, 19, 23, 4).tobytes()).save(root / "odd/cmyk.jpg")
    gray16 = (np.arange(21 * 25, dtype=np.uint16).reshape(21, 25) * 97) % 65535
    Image.fromarray(gray16).save(root / "odd/gray16.png")
    Image.fromarray(_noise(41, 22, 26)).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "odd/palette.png")
    frames = [Image.fromarray(_noise(42 + i, 18, 24)).convert("P") for i in range(3)]
    frames[0].save(root / "odd/animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    Image.fromarray(_noise(45, 24, 20, 4), "RGBA").save(root / "odd/rgba.png")

    (root / "bad").mkdir()
    (root / "bad/empty.png").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.fromarray(_noise(50, 64, 64)).save(jpeg, "JPEG", quality=95)
    (root / "bad/truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "bad/text.png").write_text("this is not an image\n")
    (root / "bad/bomb.png").write_bytes(_png_claiming_size(100_000, 100_000))
    Image.fromarray(_noise(51, 300, 300)).save(root / "bad/big.png")  # real, but over PIXEL_LIMIT
    (root / "notes.txt").write_text("not an image extension: not even looked at\n")


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "images"
    for seed, name in enumerate(GOOD):
        _write_image(root / name, seed)
    _write_odd_and_bad(root)
    return root


def _build(source, out, model_dir, **kwargs):
    kwargs = {"progress": False, "workers": 2, "max_image_pixels": PIXEL_LIMIT, "device": "cpu", **kwargs}
    return build_index(str(source), out, model_dir=model_dir, **kwargs)


def _open(directory, **kwargs) -> IndexStore:
    return IndexStore.open(directory, **{"device": "cpu", **kwargs})  # FAISS on the CPU, also on a GPU machine


def _all_rows(store: IndexStore) -> list[dict]:
    return store.metadata(np.arange(len(store)))


def _embed(model, pixels: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return F.normalize(model.embed(pixels, level=1), dim=-1).numpy()


# -- a folder of real files, good, odd and bad ---------------------------------------------------------------------
def test_folder_build_indexes_good_and_odd_images_and_skips_bad_ones(image_folder, tmp_path, model_dir):
    result = _build(image_folder, tmp_path / "index", model_dir, shard_size=4)
    store = _open(tmp_path / "index")

    rows = _all_rows(store)
    assert [r["key"] for r in rows] == sorted(GOOD + ODD)  # sorted, deterministic order; ids are rows
    assert [r["id"] for r in rows] == list(range(len(rows)))
    assert all(r["label"] is None and r["source"] == str(image_folder.resolve()) for r in rows)
    assert (store.labels == -1).all()
    assert not store.has_labels and knn.labels_of(store, np.array([[0, -1], [1, 2]])).tolist() == [[-1, -1], [-1, -1]]
    by_key = {r["key"]: r for r in rows}
    assert (by_key["odd/cmyk.jpg"]["width"], by_key["odd/cmyk.jpg"]["height"]) == (23, 19)  # original size
    gray16_bytes = (image_folder / "odd/gray16.png").read_bytes()
    assert by_key["odd/gray16.png"]["sha256"] == hashlib.sha256(gray16_bytes).hexdigest()

    skipped = {s["key"]: s["reason"] for s in store.manifest["skipped"]}
    assert set(skipped) == set(BAD)
    for key, words in BAD.items():
        assert words in skipped[key], (key, skipped[key])
    assert result.manifest["build"]["skipped"] == len(BAD)

    # the stored vectors are what the model makes of each file through its own preprocessing
    model = vision_model.from_pretrained(model_dir)
    expected = _embed(model, model.preprocess([Image.open(io.BytesIO((image_folder / key).read_bytes()))
                                               for key in by_key]))
    np.testing.assert_allclose(store.vectors, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(store.vectors, axis=1), 1.0, atol=1e-5)

    scores, ids = store.search(store.vectors[:5], k=3)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4] and scores.dtype == np.float32 and ids.dtype == np.int64
    scores, ids = store.search(store.vectors[0], k=len(store) + 2)  # more than there are: padded
    assert ids[0, -2:].tolist() == [-1, -1] and np.isneginf(scores[0, -2:]).all()
    assert store.metadata([ids[0, 0], -1])[1] is None
    assert store.load_image(0).size == (by_key[rows[0]["key"]]["width"], by_key[rows[0]["key"]]["height"])


def test_manifest_describes_model_embedding_index_and_build(image_folder, tmp_path, model_dir):
    _build(image_folder, tmp_path / "index", model_dir)
    m = _open(tmp_path / "index").manifest
    assert m["weights_sha256"] == vision_model.weights_hash(model_dir)
    assert m["model_dir"] == str(model_dir.resolve())
    assert m["model_config"]["d_model"] == 64 == m["embedding_dim"]
    assert (m["granularity"], m["normalization"], m["metric"]) == ("level 1", "l2", "inner_product")
    assert (m["index_type"], m["index_factory"], m["count"]) == ("flat", "Flat", len(GOOD) + len(ODD))
    build = m["build"]
    assert build["items_seen"] == len(GOOD) + len(ODD) + len(BAD)
    assert build["indexed"] == len(GOOD) + len(ODD) and build["device"] == "cpu"
    assert build["seconds"] > 0 and build["images_per_second"] > 0


def test_imagefolder_labels_match_torchvision(tmp_path, model_dir):
    from torchvision.datasets import ImageFolder

    root = tmp_path / "classes"
    for seed, name in enumerate(["dog/d1.png", "cat/c2.jpg", "cat/c1.png", "dog/d0.jpg", "emu/e0.png"]):
        _write_image(root / name, seed)
    reference = ImageFolder(str(root))
    source = open_source(f"imagefolder:{root}")
    assert source.label_names == tuple(reference.classes)
    assert [(str(item.path), item.label) for item in source.items] == reference.samples

    _build(f"imagefolder:{root}", tmp_path / "index", model_dir)
    store = _open(tmp_path / "index")
    assert store.labels.tolist() == reference.targets
    assert store.label_names == reference.classes
    assert [r["label_name"] for r in _all_rows(store)] == [reference.classes[t] for t in reference.targets]


def test_fashion_mnist_source_with_limit(tmp_path, model_dir):
    result = _build("fashion-mnist:test", tmp_path / "index", model_dir, limit=300, batch_size=128)
    store = _open(tmp_path / "index")
    images, labels = load_fashion_mnist("test")
    rows = _all_rows(store)
    assert len(store) == 300 and result.added == 300
    assert rows[123]["key"] == "fashion-mnist:test/000123" and rows[123]["source"] == "fashion-mnist:test"
    assert (rows[0]["width"], rows[0]["height"]) == (28, 28)
    assert store.labels.tolist() == labels[:300].tolist()
    assert store.has_labels
    ids = np.array([[7, -1, 299], [0, 0, 123]])
    assert knn.labels_of(store, ids).tolist() == [[labels[7], -1, labels[299]], [labels[0], labels[0], labels[123]]]
    assert knn.labels_of(store, np.arange(300)).dtype == np.int64 and knn.labels_of(store, []).shape == (0,)
    with pytest.raises(IndexError, match="300"):
        knn.labels_of(store, [5, 300])
    assert rows[7]["label_name"] == FASHION_MNIST_CLASSES[labels[7]]
    assert store.label_names == list(FASHION_MNIST_CLASSES)
    model = vision_model.from_pretrained(model_dir)
    expected = _embed(model, to_model_input(model.config, images[:300]))  # the arrays, as the model trained on
    np.testing.assert_allclose(store.vectors, expected, atol=1e-5)


# -- resumable builds ----------------------------------------------------------------------------------------------
class SimulatedKill(Exception):
    pass


def test_killed_build_resumes_and_equals_an_uninterrupted_build(image_folder, tmp_path, model_dir):
    def kill_after_two_shards(done: int, total: int) -> None:
        if done == 2:
            raise SimulatedKill

    out = tmp_path / "resumed"
    with pytest.raises(SimulatedKill):
        _build(image_folder, out, model_dir, shard_size=4, batch_size=3, on_shard=kill_after_two_shards)
    assert not (out / "CURRENT").exists()
    assert len(list((out / "shards").rglob("piece-*.npz"))) == 2  # one piece per shard: no checkpoint was due
    with pytest.raises(FileNotFoundError, match="unfinished build"):
        _open(out)

    resumed = _build(image_folder, out, model_dir, shard_size=4, batch_size=3)
    assert resumed.manifest["build"]["resumed_shards"] == 2
    assert resumed.manifest["build"]["shards"] == 5  # 20 image files, 4 per shard
    assert not (out / "shards").exists()  # cleaned up once published
    reference = _build(image_folder, tmp_path / "reference", model_dir, shard_size=4, batch_size=3)

    a, b = _open(out), _open(tmp_path / "reference")
    assert _all_rows(a) == _all_rows(b)  # ids, keys, hashes, sizes
    assert np.array_equal(a.vectors, b.vectors)  # bit for bit
    assert a.manifest["skipped"] == b.manifest["skipped"] == reference.manifest["skipped"]
    assert [x.tolist() for x in a.search(a.vectors, 3)] == [x.tolist() for x in b.search(b.vectors, 3)]


def test_build_killed_mid_shard_resumes_from_its_last_checkpoint(tmp_path, model_dir):
    """Work is saved on a time basis inside a shard, not only at its end: a build of one big shard killed half-way
    keeps what it saved, resumes from there, and stores the bits an uninterrupted build stores. Its manifest counts
    the stage times and the throughput of the whole build, both runs."""
    folder = tmp_path / "images"
    for seed in range(23):
        _write_image(folder / f"{seed:02d}.png", seed)
    (folder / "08bad.jpg").write_bytes(b"not a jpeg")  # item 9, skipped, inside the saved part
    common = {"shard_size": 1000, "batch_size": 4}  # one shard holds everything
    killed_at = []

    def kill_at_the_third_checkpoint(done: int, total: int) -> None:
        killed_at.append(done)
        if len(killed_at) == 3:
            raise SimulatedKill

    out = tmp_path / "resumed"
    with pytest.raises(SimulatedKill):  # checkpoint_seconds=0: a checkpoint after every batch
        _build(folder, out, model_dir, checkpoint_seconds=0, on_checkpoint=kill_at_the_third_checkpoint, **common)
    assert killed_at == [4, 8, 13]  # the skipped item 9 is saved with the batch it falls in
    pieces = list((out / "shards").rglob("piece-*.npz"))
    assert len(pieces) == 3
    first_run_seconds = sum(pipeline.read_piece_meta(path)["wall"] for path in pieces)

    resumed = _build(folder, out, model_dir, **common).manifest["build"]
    assert (resumed["resumed_items"], resumed["resumed_shards"], resumed["pieces"]) == (13, 0, 4)
    assert resumed["this_run"]["items"] == 24 - 13 and resumed["skipped"] == 1
    stages = resumed["stage_seconds"]
    assert set(stages) == {"read", "decode", "preprocess", "wait", "gpu_decode", "encode", "write", "assemble"}
    assert all(v >= 0 for v in stages.values()) and stages["decode"] > 0 and stages["encode"] > 0
    assert resumed["pipeline_seconds"] > first_run_seconds > 0  # the first run's time counts too
    assert resumed["images_per_second"] == pytest.approx(24 / resumed["pipeline_seconds"], rel=0.01)

    _build(folder, tmp_path / "reference", model_dir, **common)
    a, b = _open(out), _open(tmp_path / "reference")
    assert _all_rows(a) == _all_rows(b) and len(a) == 23
    assert np.array_equal(a.vectors, b.vectors)  # bit for bit
    assert a.manifest["skipped"] == b.manifest["skipped"]


# -- adding to an index --------------------------------------------------------------------------------------------
def test_add_indexes_only_new_or_changed_files(tmp_path, model_dir):
    folder = tmp_path / "images"
    for seed, name in enumerate(GOOD):
        _write_image(folder / name, seed)
    out = tmp_path / "index"
    _build(folder, out, model_dir)
    before = _open(out)
    old_rows, old_vectors = _all_rows(before), np.array(before.vectors)

    _write_image(folder / "new/x.png", 100)
    _write_image(folder / "new/y.jpg", 101)
    _write_image(folder / "b0.png", 102)  # same key, new content: indexed again
    result = _build(folder, out, model_dir, add=True, shard_size=4)
    assert result.added == 3
    build = result.manifest["build"]
    assert (build["mode"], build["indexed"], build["already_indexed"]) == ("add", 3, len(GOOD) - 1)

    after = _open(out)
    rows = _all_rows(after)
    assert len(after) == len(GOOD) + 3 and after.manifest["version"] == "v000002"
    assert rows[:len(GOOD)] == old_rows  # old ids keep their rows and vectors
    assert np.array_equal(after.vectors[:len(GOOD)], old_vectors)
    assert [r["key"] for r in rows[len(GOOD):]] == ["b0.png", "new/x.png", "new/y.jpg"]
    assert [r["id"] for r in rows[len(GOOD):]] == [len(GOOD), len(GOOD) + 1, len(GOOD) + 2]
    scores, ids = after.search(after.vectors[len(GOOD):], 1)
    assert ids[:, 0].tolist() == [len(GOOD), len(GOOD) + 1, len(GOOD) + 2]
    assert len(after.manifest["history"]) == 2

    again = _build(folder, out, model_dir, add=True)
    assert again.added == 0 and _open(out).manifest["version"] == "v000002"


def test_add_with_a_different_model_is_refused(image_folder, tmp_path, model_dir, other_model_dir):
    out = tmp_path / "index"
    _build(image_folder, out, model_dir)
    _write_image(image_folder / "late.png", 200)
    with pytest.raises(ValueError, match="refusing to add") as refused:
        _build(image_folder, out, other_model_dir, add=True)
    message = str(refused.value)
    assert str(model_dir.resolve()) in message and str(other_model_dir) in message
    assert vision_model.weights_hash(model_dir)[:16] in message
    assert vision_model.weights_hash(other_model_dir)[:16] in message
    assert len(_open(out)) == len(GOOD) + len(ODD)  # untouched


# -- multi-view database embeddings ---------------------------------------------------------------------------------
def test_views_build_stores_the_normalised_mean_of_each_views_embedding(tmp_path, model_dir, capsys):
    """--views flip: each vector is the mean of the image's and its mirror's unit embeddings, renormalised; the
    manifest says so; --add keeps the index's views and refuses others; a killed build resumes to the same vectors."""
    out = tmp_path / "index"
    result = _build("fashion-mnist:test", out, model_dir, limit=40, batch_size=16, views="flip")
    assert (result.manifest["views"], result.manifest["view_count"]) == ("flip", 2)
    store = _open(out)
    assert store.views == "flip"
    model = vision_model.from_pretrained(model_dir)
    images, _ = load_fashion_mnist("test")
    pixels = to_model_input(model.config, images[:40])
    both = _embed(model, pixels) + _embed(model, pixels.flip(-1))
    expected = both / np.linalg.norm(both, axis=1, keepdims=True)
    np.testing.assert_allclose(store.vectors, expected, atol=1e-5)
    assert not np.allclose(store.vectors, _embed(model, pixels), atol=1e-3)  # the views did change the vectors

    grown = _build("fashion-mnist:test", out, model_dir, limit=50, add=True)  # no --views: the index's own
    assert grown.added == 10 and grown.manifest["views"] == "flip"
    from app.cli import main
    assert main(["index", "info", str(out)]) == 0
    assert "l2-normalised, inner_product, the average of 2 views (flip)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="view set 'flip', not 'shift1'"):
        _build("fashion-mnist:test", out, model_dir, limit=60, add=True, views="shift1")
    with pytest.raises(ValueError, match="unknown view set 'mirror'"):
        _build("fashion-mnist:test", tmp_path / "other", model_dir, limit=10, views="mirror")

    def kill_after_one_shard(done: int, total: int) -> None:
        raise SimulatedKill

    resumed = tmp_path / "resumed"
    with pytest.raises(SimulatedKill):
        _build("fashion-mnist:test", resumed, model_dir, limit=40, shard_size=16, views="shift1",
               on_shard=kill_after_one_shard)
    with pytest.raises(SimulatedKill):  # another view set is another plan: the finished shard is not reused
        _build("fashion-mnist:test", resumed, model_dir, limit=40, shard_size=16, views="flip",
               on_shard=kill_after_one_shard)
    finished = _build("fashion-mnist:test", resumed, model_dir, limit=40, shard_size=16, views="shift1")
    assert finished.manifest["build"]["resumed_shards"] == 1
    uninterrupted = _build("fashion-mnist:test", tmp_path / "reference", model_dir, limit=40, shard_size=16,
                           views="shift1")
    assert np.array_equal(_open(resumed).vectors, _open(tmp_path / "reference").vectors)
    assert uninterrupted.manifest["view_count"] == 10


# -- index types ---------------------------------------------------------------------------------------------------
def test_index_types_agree_on_top1_for_small_data(tmp_path, model_dir):
    stores = {}
    for kind in ("flat", "hnsw", "ivf", "ivfpq", "auto", "IVF4,Flat"):
        _build("fashion-mnist:test", tmp_path / kind, model_dir, limit=400, index_type=kind)
        stores[kind] = _open(tmp_path / kind)
    assert stores["flat"].manifest["index_factory"] == "Flat"
    assert stores["hnsw"].manifest["index_factory"] == "HNSW32"
    assert stores["ivf"].manifest["index_factory"] == "IVF10,Flat"  # 400 / 39 caps 4 * sqrt(400) = 80
    assert stores["ivfpq"].manifest["index_factory"].startswith("IVF10,PQ16x")
    assert stores["auto"].manifest["index_factory"] == "Flat"  # small: exact
    assert stores["IVF4,Flat"].manifest["index_type"] == "factory"
    for kind in ("ivf", "IVF4,Flat"):  # every list probed: IVF becomes exact
        nlist = stores[kind].manifest["search_params"]["nlist"]
        stores[kind] = _open(tmp_path / kind, nprobe=nlist)

    model = vision_model.from_pretrained(model_dir)
    images, _ = load_fashion_mnist("test")
    fresh = _embed(model, to_model_input(model.config, images[400:460]))  # images not in the index
    queries = np.concatenate([np.asarray(stores["flat"].vectors[:40]), fresh])
    flat_scores, flat_ids = stores["flat"].search(queries, 2)
    # leave out near-ties (a random model maps some images to all but equal vectors): their order is arbitrary
    clear = flat_scores[:, 0] - flat_scores[:, 1] > 1e-5
    assert clear.sum() >= 50
    assert (flat_ids[:40, 0] == np.arange(40))[clear[:40]].all()  # an indexed image finds itself
    for kind in ("hnsw", "ivf", "IVF4,Flat"):
        _, ids = stores[kind].search(queries, 2)
        assert ids[clear, 0].tolist() == flat_ids[clear, 0].tolist(), kind
    _, pq_ids = stores["ivfpq"].search(queries, 5)
    assert ((pq_ids >= 0) & (pq_ids < 400)).all()

    torch_store = _open(tmp_path / "flat", backend="torch")  # the CUDA fallback's code
    torch_scores, torch_ids = torch_store.search(queries, 2)
    assert torch_store.backend == "torch"
    assert torch_ids[clear, 0].tolist() == flat_ids[clear, 0].tolist()
    np.testing.assert_allclose(torch_scores, flat_scores, atol=1e-5)


def test_auto_index_choice_follows_size_and_memory_budget():
    from index.index_types import choose_index

    d = 192
    assert choose_index("auto", 10_000, d).factory == "Flat"  # small: exact
    assert choose_index("auto", 500_000, d, memory_budget_mb=4096).factory == "HNSW32"  # medium, room for a graph
    assert choose_index("auto", 500_000, d, memory_budget_mb=400).factory == "IVF2828,Flat"  # no room for a graph
    large = choose_index("auto", 20_000_000, d, memory_budget_mb=2048)  # large: compressed to fit the budget
    m = int(large.factory.split(",PQ")[1].split("x")[0])
    assert large.factory.startswith("IVF17889,PQ") and d % m == 0 and 20_000_000 * (m + 8) < 2048 * 2 ** 20
    huge = choose_index("auto", 100_000_000, d, memory_budget_mb=64)  # codes on disk, memory-mapped
    assert huge.storage == "ondisk" and huge.factory.startswith("IVF40000_HNSW32,PQ")
    with pytest.raises(ValueError, match="memory budget"):
        choose_index("auto", 100_000_000, d, memory_budget_mb=16)


def test_unknown_index_type_is_a_clear_error(image_folder, tmp_path, model_dir):
    with pytest.raises(ValueError, match="neither one of"):
        _build(image_folder, tmp_path / "index", model_dir, index_type="NoSuchIndex")


# -- atomicity and damaged folders ---------------------------------------------------------------------------------
def test_failed_rebuild_leaves_the_previous_index_readable(image_folder, tmp_path, model_dir, monkeypatch):
    out = tmp_path / "index"
    _build(image_folder, out, model_dir)
    previous = _open(out)
    expected_rows, expected_vectors = _all_rows(previous), np.array(previous.vectors)
    _write_image(image_folder / "more.png", 300)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    real_atomic_write = build_module.atomic_write
    for failing in ("faiss_write", "publish"):  # half-way through assembly, and at the very swap
        with monkeypatch.context() as patch:
            if failing == "faiss_write":
                patch.setattr(faiss, "write_index", disk_full)
            else:
                patch.setattr(build_module, "atomic_write", lambda path, data: disk_full()
                              if path.name == "CURRENT" else real_atomic_write(path, data))
            with pytest.raises(OSError, match="No space"):
                _build(image_folder, out, model_dir, index_type="hnsw")
        still = _open(out)
        assert still.manifest["version"] == "v000001" and still.manifest["index_factory"] == "Flat"
        assert _all_rows(still) == expected_rows and np.array_equal(still.vectors, expected_vectors)
        assert still.search(expected_vectors[:3], 1)[1][:, 0].tolist() == [0, 1, 2]

    _build(image_folder, out, model_dir, index_type="hnsw")  # the next build cleans up and succeeds
    assert _open(out).manifest["index_factory"] == "HNSW32"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("v")) == ["v000002"]


def test_missing_or_damaged_index_folders_give_clear_errors(image_folder, tmp_path, model_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no CURRENT"):
        _open(tmp_path / "empty")

    out = tmp_path / "index"
    _build(image_folder, out, model_dir)
    version = out / "v000001"
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)

    (copy / "v000001" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(CorruptIndexError, match="not a readable FAISS index"):
        _open(copy)
    shutil.copy(version / "index.faiss", copy / "v000001")
    np.save(copy / "v000001" / "embeddings.npy", np.zeros((3, 64), np.float32))
    with pytest.raises(CorruptIndexError, match="the manifest says"):
        _open(copy)
    shutil.copy(version / "embeddings.npy", copy / "v000001")
    db = sqlite3.connect(copy / "v000001" / "metadata.sqlite")
    db.execute("DELETE FROM items WHERE id = 0")
    db.commit()
    db.close()
    with pytest.raises(CorruptIndexError, match="rows"):
        _open(copy)
    (copy / "v000001" / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptIndexError, match="not valid JSON"):
        _open(copy)
    (copy / "CURRENT").write_text("v000009\n")
    with pytest.raises(CorruptIndexError, match="does not exist"):
        _open(copy)
    assert len(_open(version)) == len(GOOD) + len(ODD)  # a version folder opens directly too


# -- the command line ----------------------------------------------------------------------------------------------
def test_cli_build_add_and_info(image_folder, tmp_path, model_dir, other_model_dir, capsys):
    from app.cli import main

    out = tmp_path / "index"
    common = ["--model", str(model_dir), "--no-progress", "--workers", "2", "--max-image-pixels", str(PIXEL_LIMIT)]
    assert main(["index", "build", str(image_folder), "--out", str(out), "--index-type", "auto",
                 "--shard-size", "8", *common]) == 0
    printed = capsys.readouterr().out
    assert f"indexed {len(GOOD) + len(ODD)} images" in printed and "bad/bomb.png" in printed

    assert main(["index", "info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"items       {len(GOOD) + len(ODD)}" in printed and "Flat (auto:" in printed
    assert "level 1, l2-normalised, inner_product" in printed and f"skipped     {len(BAD)} files" in printed
    assert "img/s over" in printed and "stages      read " in printed and ", decode " in printed

    assert main(["index", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == len(GOOD) + len(ODD)

    _write_image(image_folder / "late.png", 400)
    assert main(["index", "build", str(image_folder), "--out", str(out), "--add", *common]) == 0
    assert "added 1 images" in capsys.readouterr().out

    assert main(["index", "build", str(image_folder), "--out", str(out), "--add",
                 "--model", str(other_model_dir), "--no-progress"]) == 1
    assert "refusing to add" in capsys.readouterr().err

    assert main(["index", "info", str(tmp_path / "missing")]) == 1
    assert "no index at" in capsys.readouterr().err
    assert main(["index"]) == 2


def test_bench_index_measures_encoder_only_and_the_build_in_one_run(tmp_path, model_dir, capsys):
    from app.cli import main

    folder = tmp_path / "images"
    for seed in range(6):
        _write_image(folder / f"{seed}.jpg", seed)
    out = tmp_path / "bench.json"
    assert main(["bench", "index", "--source", str(folder), "--model", str(model_dir), "--device", "cpu",
                 "--batch-size", "4", "--workers", "1", "--encoder-seconds", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["items"] == 6 and report["batch_size"] == 4 and report["workers"] == 1
    assert report["encoder_only"]["images_per_second"] > 0 and report["build"]["images_per_second"] > 0
    assert report["build_vs_encoder"] == pytest.approx(
        report["build"]["images_per_second"] / report["encoder_only"]["images_per_second"], abs=0.002)
    assert report["build"]["stage_seconds"]["decode"] > 0
    assert "encoder-only" in capsys.readouterr().out
