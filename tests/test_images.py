"""The one decoder (vision_model/images.py) and the one model input (vision_model/preprocess.py), end to end.

Real files made by the test: a PNG above Pillow's default pixel limit, a planted bomb, alpha-only and blank
wallpapers, a photo-sized JPEG, a file name with a newline; indexed with the shipped model, searched through the
CLI and the Streamlit page (AppTest).
"""
from __future__ import annotations

import io
import json
import logging
import re
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import vision_model
from app.cli import main as matsearch
from index import IndexStore, build_index
from retrieval.encoder import QueryEncoder, load_query_image
from vision_model.images import DEFAULT_MAX_PIXELS, UnreadableImage, decode_image, is_blank, original_size
from vision_model.preprocess import reset_domain_warnings, to_model_input

BIG = (9500, 9500)  # 90.25 MP: just above Pillow's default limit of 89,478,485 pixels
RAISED = 100_000_000
NEWLINE_NAME = "two\nlines.png"


def _bmp_claiming_size(width: int, height: int) -> bytes:
    """A little BMP whose header claims width x height 24-bit pixels (and holds a few): a planted bomb."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    pixels = bytes(64)
    return struct.pack("<2sIHHI", b"BM", 14 + len(info) + len(pixels), 0, 0, 14 + len(info)) + info + pixels


def _alpha_only(size=(640, 400)) -> Image.Image:
    """A wallpaper whose picture lives in its alpha channel over constant white RGB (as MATE's Waves, Silk...)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    alpha = (127 + 120 * np.sin(x / 23.0) * np.cos(y / 31.0)).astype(np.uint8)
    rgba = np.dstack([np.full((h, w, 3), 255, np.uint8), alpha])
    return Image.fromarray(rgba, "RGBA")


def _photo(size=(1600, 1200), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.int16)
    return Image.fromarray(np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def big_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "huge.png"
    img = Image.new("L", BIG, 0)
    img.paste(255, (1000, 1000, 6000, 8000))  # a white block: content survives the reduction
    img.save(path, compress_level=1)
    return path


# -- the decoder ------------------------------------------------------------------------------------------------------
def test_a_raised_limit_admits_a_large_png_decoded_at_reduced_size(big_png):
    with pytest.raises(UnreadableImage) as refused:
        decode_image(big_png)
    assert re.findall(r"\d{1,3}(?:,\d{3}){2,}", refused.value.reason) == ["90,250,000", f"{DEFAULT_MAX_PIXELS:,}"]
    img = decode_image(big_png, max_pixels=RAISED, target_size=28)
    assert original_size(img) == BIG and 28 <= min(img.size) < 56 and img.mode == "L"
    assert not is_blank(img)


def test_a_planted_bomb_names_one_limit_the_one_applied():
    for limit in (None, RAISED):
        with pytest.raises(UnreadableImage) as bomb:
            decode_image(_bmp_claiming_size(100_000, 100_000), max_pixels=limit)
        numbers = re.findall(r"\d{1,3}(?:,\d{3}){2,}", bomb.value.reason)
        assert numbers == ["10,000,000,000", f"{limit or DEFAULT_MAX_PIXELS:,}"], bomb.value.reason
        assert "decompression bomb" in bomb.value.reason


def test_alpha_only_pictures_survive_and_blank_images_are_blank():
    img = decode_image(_png_bytes(_alpha_only()))
    assert img.mode == "RGB" and not is_blank(img)  # white picture on black, not white on white
    model = vision_model.load_model()  # the shipped model inverts light-background images: not to all-black
    x = to_model_input(model.config, img)
    assert x.std() > 0.1
    assert is_blank(decode_image(_png_bytes(Image.new("RGB", (300, 200), (30, 120, 200)))))
    assert is_blank(decode_image(_png_bytes(Image.new("RGBA", (300, 200), (0, 0, 0, 0)))))  # fully transparent
    dark_on_clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    dark_on_clear.paste((20, 20, 20, 255), (16, 16, 48, 48))
    assert decode_image(_png_bytes(dark_on_clear)).getpixel((0, 0)) == (255, 255, 255)  # dark art: on white


def test_jpeg_draft_decoding_is_used_and_identical_for_index_and_query(tmp_path):
    path = tmp_path / "photo.jpg"
    _photo().save(path, quality=90)
    assert decode_image(path, target_size=28).size == (40, 30)  # libjpeg's 1/8 scale, then a 1/5 box reduction
    assert decode_image(path, target_size=224).size == (400, 300)  # 1/4: both sides stay >= 224
    assert decode_image(path).size == (1600, 1200)
    model = vision_model.load_model()
    out = tmp_path / "index"
    build_index(str(tmp_path), out, progress=False, device="cpu", workers=1)
    with IndexStore.open(out, device="cpu") as store:
        stored = np.array(store.vectors[0])
    query = QueryEncoder(model).encode([path]).embeddings[0]
    assert np.array_equal(stored, query)
    via_bytes = to_model_input(model.config, load_query_image(path.read_bytes(), target_size=28))
    assert torch.equal(via_bytes, QueryEncoder(model).to_pixels([path]))


def test_the_domain_warning_is_said_once(caplog):
    reset_domain_warnings()
    config = vision_model.get_config("matmamba_vision_fmnist", trained_on="Fashion-MNIST")
    grey_small = Image.new("L", (28, 28), 0)
    with caplog.at_level(logging.WARNING, logger="vision_model.preprocess"):
        to_model_input(config, [grey_small] * 3)
        assert caplog.records == []  # a fitting image says nothing
        to_model_input(config, [_photo(), _photo(seed=1)])
        to_model_input(config, _photo(seed=2))
    (record,) = caplog.records
    message = record.getMessage()
    assert "28×28 grey Fashion-MNIST" in message and "colour and 1600×1200 px" in message
    assert "matsearch model list" in message and "matsearch model import" in message
    reset_domain_warnings()


def _png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


# -- in an index, in search results, on the page -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def wallpapers(tmp_path_factory, big_png) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("wallpapers")
    _alpha_only().save(folder / "waves.png")
    Image.new("RGB", (320, 200), (240, 240, 240)).save(folder / "blank.png")
    _photo((400, 300)).save(folder / NEWLINE_NAME)
    (folder / "bomb.bmp").write_bytes(_bmp_claiming_size(100_000, 100_000))
    (folder / "huge.png").symlink_to(big_png)
    out = tmp_path_factory.mktemp("index") / "idx"
    result = build_index(str(folder), out, progress=False, device="cpu", workers=2, max_image_pixels=RAISED)
    return SimpleNamespace(folder=folder, index=out, result=result)


def test_index_records_blank_items_and_admits_the_large_png(wallpapers, capsys):
    skipped = {s["key"]: s["reason"] for s in wallpapers.result.skipped}
    assert list(skipped) == ["bomb.bmp"] and f"{RAISED:,}" in skipped["bomb.bmp"]
    with IndexStore.open(wallpapers.index, device="cpu") as store:
        rows = {row["key"]: row for row in store.metadata(range(len(store)))}
    assert {key: row["blank"] for key, row in rows.items()} == {
        "blank.png": True, "huge.png": False, NEWLINE_NAME: False, "waves.png": False}
    assert (rows["huge.png"]["width"], rows["huge.png"]["height"]) == BIG
    assert matsearch(["index", "info", str(wallpapers.index)]) == 0
    assert "4, unlabelled, 1 blank (no content: one colour)" in capsys.readouterr().out


def test_search_output_flags_blank_items_and_keeps_newline_names_on_one_line(wallpapers, capsys):
    query = str(wallpapers.folder / "blank.png")
    assert matsearch(["search", "--index", str(wallpapers.index), query, "--k", "4"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(table) == 2 + 4  # the heading, the column names and one line per result
    assert "note" in table[1]
    rows = {line.split()[-1]: line for line in table[2:]}
    assert rows["blank.png"].split()[4] == "blank" and rows["waves.png"].split()[4] == "-"
    assert "two\\nlines.png" in rows
    assert matsearch(["search", "--index", str(wallpapers.index), query, "--k", "4", "--json"]) == 0
    metadata = json.loads(capsys.readouterr().out)["results"][0]["metadata"]
    assert {row["key"]: row["blank"] for row in metadata}["blank.png"] is True
    assert NEWLINE_NAME in {row["key"] for row in metadata}


def test_the_page_flags_blank_results_and_says_what_the_model_saw(wallpapers, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    for name in ("MATSEARCH_APP_EVAL_JSON", "MATSEARCH_APP_LIMIT", "MATSEARCH_APP_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MATSEARCH_APP_INDEX", str(wallpapers.index))
    monkeypatch.setenv("MATSEARCH_APP_DEVICE", "cpu")
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"),
                           default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("trained on 28×28 grey Fashion-MNIST images" in c.value for c in at.caption)
    at.session_state["query_tab"] = ":material/photo_library: Pick from the database"  # drawn while shown
    at.run()
    with IndexStore.open(wallpapers.index, device="cpu") as store:
        waves = next(row["id"] for row in store.metadata(range(len(store))) if row["key"] == "waves.png")
    at.button(key=f"pick-{waves}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    captions = [md.value for md in at.markdown if md.value.startswith("**#")]
    assert len(captions) == 3  # the other items; the blank one says so
    assert [("blank: no content" in c) for c in captions].count(True) == 1
    assert any("blank: no content" in c and "blank.png" in c for c in captions)
