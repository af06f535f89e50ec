"""The Streamlit search page: its logic through Streamlit's AppTest, and the real server in headless Chromium.

A small random model and a few hundred Fashion-MNIST train images indexed with it, built once per session in
temporary folders. The browser tests (marked `browser`) need Debian's /usr/bin/chromium; they start
`matsearch app` on a free localhost port and always stop it.
"""
from __future__ import annotations

import gc
import io
import json
import os
import re
import shutil
import socket
import struct
import threading
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import vision_model
from index import IndexStore, build_index
from vision_model.datasets import load_fashion_mnist

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP_SCRIPT = ROOT / "app" / "streamlit_app.py"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
N_INDEX = 300
DEFAULT_K = 12
APP_ENV = ("MATSEARCH_APP_INDEX", "MATSEARCH_APP_MODEL", "MATSEARCH_APP_EVAL_JSON", "MATSEARCH_APP_LIMIT",
           "MATSEARCH_APP_DEVICE", "MATSEARCH_APP_MAX_UPLOAD_MB", "MATSEARCH_APP_MAX_PIXELS",
           "MATSEARCH_APP_MAX_FILES")
GALLERY_TAB = ":material/photo_library: Pick from the database"
HIT = re.compile(r"\*\*#(\d+)\*\* &nbsp;score \*\*(-?[\d.]+)\*\*  \n(.*)")


# -- data: a small random model, an index of it, its eval records and budget frontier ---------------------------------
def _mflops(config, **submodel) -> float:
    return vision_model.submodel_cost(config, include_head=False, **submodel).mflops


@pytest.fixture(scope="session")
def app_data(tmp_path_factory) -> SimpleNamespace:
    from retrieval.budget import Frontier, FrontierPoint
    from retrieval.submodel import Submodel

    root = tmp_path_factory.mktemp("app")
    torch.manual_seed(0)
    model = vision_model.create_model("matmamba_vision_fmnist", depth=2, d_model=64, d_state=16)
    model_dir = vision_model.save_pretrained(model, root / "model")
    index_dir = root / "index"
    build_index("fashion-mnist:train", index_dir, model_dir=model_dir, limit=N_INDEX, progress=False, device="cpu",
                workers=2)
    config = model.config

    # evaluation records, found by the page beside the model (retrieval_eval.json)
    levels = {"D": 1, "D/2": 2, "D/4": 4, "D/8": 8}
    records = [{"setting": name, "kind": "level", "top1": 0.9 - 0.02 * i, "map@10": 0.8 - 0.02 * i,
                "query_mflops": _mflops(config, level=level), "latency_ms": 2.0 / level}
               for i, (name, level) in enumerate(levels.items())]
    records.append({"setting": "mnm:64,16", "kind": "mix'n'match", "top1": 0.85, "map@10": 0.75,
                    "query_mflops": _mflops(config, widths=(64, 16)), "latency_ms": 1.0})
    (model_dir / "retrieval_eval.json").write_text(json.dumps(records))

    # a budget frontier of three points; the middle one is Mix'n'Match
    points = [FrontierPoint(Submodel(level=8), 0.6, 0.3, _mflops(config, level=8), 0.5),
              FrontierPoint(Submodel(widths=(32, 16)), 0.7, 0.5, _mflops(config, widths=(32, 16)), 0.8),
              FrontierPoint(Submodel(level=1), 0.9, 1.0, _mflops(config, level=1), 2.0)]
    Frontier(points, points, {"weights_sha256": vision_model.weights_hash(model_dir), "machine": "a test"}).save(
        model_dir)

    no_frontier = root / "model-copy"  # the same weights, no pareto.json
    no_frontier.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(model_dir / name, no_frontier / name)

    store = IndexStore.open(index_dir, device="cpu")
    return SimpleNamespace(root=root, model_dir=model_dir, index_dir=index_dir, config=config, store=store,
                           points=points, no_frontier=no_frontier)


@pytest.fixture
def app_env(app_data, monkeypatch) -> SimpleNamespace:
    for name in APP_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MATSEARCH_APP_INDEX", str(app_data.index_dir))
    monkeypatch.setenv("MATSEARCH_APP_MODEL", str(app_data.model_dir))
    return app_data


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _test_image_png(i: int = 0) -> bytes:
    images, _ = load_fashion_mnist("test")
    return _png(images[i, 0].numpy())


def _png_claiming_size(width: int, height: int) -> bytes:
    """A valid little PNG whose header claims width x height pixels: a decompression bomb's calling card."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


# -- AppTest helpers --------------------------------------------------------------------------------------------------
def _open_app(timeout: float = 60, gallery: bool = True) -> AppTest:
    """The page as a new session sees it; with `gallery`, then with the database tab chosen (its images are drawn
    only while it is shown)."""
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=timeout)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    if gallery:
        assert not _gallery_ids(at)
        at.session_state["query_tab"] = GALLERY_TAB
        at.run()
        assert not at.exception, [e.value for e in at.exception]
    return at


def _gallery_ids(at: AppTest) -> list[int]:
    return [int(b.key.split("-")[1]) for b in at.button if b.key and b.key.startswith("pick-")]


def _pick(at: AppTest, item_id: int | None = None) -> int:
    item_id = _gallery_ids(at)[0] if item_id is None else item_id
    at.button(key=f"pick-{item_id}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return item_id


def _metric(at: AppTest, label: str, query: int = 0) -> str:
    return [m.value for m in at.metric if m.label == label][query]


def _hits(at: AppTest, query: int = 0) -> list[int]:
    """Result ids of query `query`, best first (from the "More like this" buttons' keys)."""
    keys = [b.key for b in at.button if b.key and b.key.startswith(f"more-{query}-")]
    return [int(key.split("-")[3]) for key in sorted(keys, key=lambda k: int(k.split("-")[2]))]


def _hit_texts(at: AppTest) -> list[tuple[int, float, str]]:
    """(rank, score, label) of the first query's results, best first (the element tree lists them by column)."""
    found = [(int(m.group(1)), float(m.group(2)), m.group(3)) for m in (HIT.match(md.value) for md in at.markdown) if m]
    return sorted(found)


# -- the page, through AppTest ----------------------------------------------------------------------------------------
def test_gallery_pick_shows_k_results_with_latency_and_mflops(app_env):
    at = _open_app()
    assert [i.value for i in at.info][0].startswith("Upload an image")
    assert len(_gallery_ids(at)) == 16
    item = _pick(at)
    ids = _hits(at)
    assert len(ids) == DEFAULT_K and item not in ids  # the query item itself is left out
    assert len(set(ids)) == DEFAULT_K and all(0 <= i < N_INDEX for i in ids)
    texts = _hit_texts(at)
    assert [rank for rank, _, _ in texts] == list(range(1, DEFAULT_K + 1))  # ranks 1..k, once each
    scores = [score for _, score, _ in texts]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1.0001 for s in scores)
    labels = app_env.store.metadata(ids)
    assert [text for _, _, text in texts] == [row["label_name"] for row in labels]
    assert any(f"database #{item}" in md.value for md in at.markdown)
    for label in ("Decode (ms)", "Encode (ms)", "Search (ms)", "Rerank (ms)", "Total (ms)"):
        assert float(_metric(at, label)) >= 0
    assert float(_metric(at, "Encode (ms)")) > 0
    assert _metric(at, "Query MFLOPs") == f"{_mflops(app_env.config, level=1):.1f}"

    at.slider(key="k").set_value(5).run()
    assert len(_hits(at)) == 5 and _hits(at) == ids[:5]


def test_the_gallery_is_drawn_only_while_its_tab_is_shown(app_env):
    at = _open_app(gallery=False)
    assert not _gallery_ids(at) and not at.get("image")  # the upload tab is the first one: no database images
    at.session_state["query_tab"] = GALLERY_TAB
    at.run()
    assert len(_gallery_ids(at)) == 16 and len(at.get("image")) == 16
    _pick(at)
    ids = _hits(at)
    at.session_state["query_tab"] = ":material/upload: Upload images"
    at.run()
    assert not at.exception and not _gallery_ids(at)
    assert _hits(at) == ids  # the results stay


def test_a_rerun_with_the_same_query_and_settings_does_not_search_again(app_env, monkeypatch):
    from app import engine

    searches = []
    real_search = engine.search

    def counting_search(*args, **kwargs):
        searches.append(args[1:])
        return real_search(*args, **kwargs)

    monkeypatch.setattr(engine, "search", counting_search)
    at = _open_app()
    _pick(at)
    assert len(searches) == 1
    ids, encode_ms = _hits(at), _metric(at, "Encode (ms)")
    at.button(key="shuffle").click().run()  # other gallery images: the same query, the same results
    at.radio(key="chart_metric").set_value("map@10").run()
    assert not at.exception and len(searches) == 1
    assert _hits(at) == ids and _metric(at, "Encode (ms)") == encode_ms
    at.slider(key="k").set_value(5).run()  # a setting of the search: searched again
    assert len(searches) == 2 and _hits(at) == ids[:5]
    at.button(key=f"more-0-1-{ids[0]}").click().run()  # another query
    assert len(searches) == 3 and ids[0] not in _hits(at)


def test_what_the_page_loaded_once_is_left_out_of_the_collection_after_each_run(app_env):
    """Streamlit collects garbage after every script run; the model, torch and FAISS, loaded once per server, are
    not walked again by every session's collection."""
    import faiss

    _open_app()
    tracked = {id(o) for o in gc.get_objects()}
    assert id(torch.nn.Module) not in tracked and id(faiss.IndexFlatIP) not in tracked
    garbage = [[]]
    garbage[0].append(garbage)  # what a session creates afterwards is still collected
    del garbage
    assert gc.collect() >= 2


def test_changing_granularity_changes_the_mflops_shown(app_env):
    at = _open_app()
    _pick(at)
    shown = {}
    for name, level in (("D", 1), ("D/2", 2), ("D/4", 4), ("D/8", 8)):
        at.radio(key="granularity").set_value(name).run()
        assert not at.exception
        shown[name] = float(_metric(at, "Query MFLOPs"))
        assert shown[name] == pytest.approx(_mflops(app_env.config, level=level), abs=0.05)
        assert f"`{name}`" in " ".join(md.value for md in at.markdown if md.value.startswith("**Query:**"))
        assert len(_hits(at)) == DEFAULT_K
    assert shown["D"] > shown["D/2"] > shown["D/4"] > shown["D/8"]


def test_bad_uploads_show_clear_errors_and_good_ones_still_search(app_env, monkeypatch):
    monkeypatch.setenv("MATSEARCH_APP_MAX_UPLOAD_MB", "0.02")  # 20 KB
    monkeypatch.setenv("MATSEARCH_APP_MAX_PIXELS", "5000")
    rng = np.random.default_rng(0)
    good = _test_image_png(0)
    full = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)).save(full, "PNG")
    files = [
        ("query.png", good, "image/png"),
        ("notes.txt", b"this is not an image\n", "text/plain"),
        ("broken.png", full.getvalue()[: len(full.getvalue()) // 2], "image/png"),
        ("bomb.png", _png_claiming_size(100_000, 100_000), "image/png"),
        ("wide.png", _png(np.zeros((80, 80), np.uint8)), "image/png"),  # 6,400 pixels > 5,000
        ("huge.bmp", b"BM" + bytes(30_000), "image/bmp"),  # 30 KB > 20 KB
        ("empty.jpg", b"", "image/jpeg"),
    ]
    at = _open_app()
    at.file_uploader(key="uploads").set_value(files).run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    expected = {"notes.txt": "not an image", "broken.png": "corrupt", "bomb.png": "too large",
                "wide.png": "too large", "huge.bmp": "over the limit", "empty.jpg": "empty"}
    assert len(errors) == len(expected), errors
    for name, words in expected.items():
        assert any(name in e and words in e for e in errors), (name, errors)
    assert not any("Traceback" in e for e in errors)
    assert len(_hits(at)) == DEFAULT_K  # the one good file was searched
    assert any("**Query:** query.png" in md.value for md in at.markdown)

    at.file_uploader(key="uploads").set_value(("only-bad.gif", b"GIF89a garbage", "image/gif")).run()
    assert not at.exception and len(at.error) == 1 and "only-bad.gif" in at.error[0].value
    assert _hits(at) == []


def test_upload_several_images_gives_results_for_each(app_env):
    at = _open_app()
    at.file_uploader(key="uploads").set_value([(f"q{i}.png", _test_image_png(i), "image/png") for i in range(3)])
    at.run()
    assert not at.exception and not at.error
    for q in range(3):
        assert len(_hits(at, q)) == DEFAULT_K
        assert float(_metric(at, "Total (ms)", q)) > 0


def test_label_filter_restricts_results(app_env):
    at = _open_app()
    _pick(at)
    names = app_env.store.label_names
    assert at.multiselect(key="labels").options == names
    for chosen in (["Trouser"], ["Bag", "Sneaker"]):
        at.multiselect(key="labels").set_value(chosen).run()
        assert not at.exception
        ids = _hits(at)
        assert len(ids) == DEFAULT_K
        assert {row["label_name"] for row in app_env.store.metadata(ids)} <= set(chosen)
        assert {text for _, _, text in _hit_texts(at)} <= set(chosen)


def test_score_threshold_drops_low_scores(app_env):
    at = _open_app()
    _pick(at)
    scores = [score for _, score, _ in _hit_texts(at)]
    cut = round((scores[0] + scores[-1]) / 2, 3)
    at.toggle(key="use_threshold").set_value(True).run()
    at.slider(key="threshold").set_value(cut).run()
    assert not at.exception
    kept = [score for _, score, _ in _hit_texts(at)]
    assert 0 < len(kept) < len(scores) and all(s >= cut - 5e-4 for s in kept)
    at.slider(key="threshold").set_value(1.0).run()  # nothing scores above 1: a clear note, no error
    assert _hits(at) == [] and "No results" in at.warning[0].value


def test_more_like_this_searches_with_a_result(app_env):
    at = _open_app()
    _pick(at)
    second = _hits(at)[1]
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("more-0-2-"))).click().run()
    assert not at.exception
    assert any(f"database #{second}" in md.value for md in at.markdown)
    assert second not in _hits(at) and len(_hits(at)) == DEFAULT_K


def test_funnel_and_adaptive_are_exclusive_and_report_their_cost(app_env):
    at = _open_app()
    _pick(at)
    at.radio(key="granularity").set_value("D/8").run()
    at.toggle(key="funnel").set_value(True).run()
    assert not at.exception and len(_hits(at)) == DEFAULT_K
    both = _mflops(app_env.config, level=8) + _mflops(app_env.config, level=1)
    assert float(_metric(at, "Query MFLOPs")) == pytest.approx(both, abs=0.05)  # the funnel pays both encodes
    assert any("`D/8 → D` (reranked)" in md.value for md in at.markdown)
    assert float(_metric(at, "Rerank (ms)")) > 0

    at.toggle(key="adaptive").set_value(True).run()
    assert not at.exception and at.toggle(key="funnel").value is False
    assert at.radio(key="gate").value == "label vote"  # the index has labels: the vote is the default gate
    at.radio(key="gate").set_value("score margin").run()
    at.slider(key="margin").set_value(0.0).run()  # margin 0: never escalates
    assert float(_metric(at, "Query MFLOPs")) == pytest.approx(_mflops(app_env.config, level=8), abs=0.05)
    assert len(_hits(at)) == DEFAULT_K


def test_the_gate_of_adaptive_search_and_of_the_funnel_is_a_choice(app_env):
    small, large = _mflops(app_env.config, level=8), _mflops(app_env.config, level=1)
    at = _open_app()
    assert at.radio(key="gate").disabled and at.slider(key="vote").disabled  # nothing gated yet
    item = _pick(at)
    at.radio(key="granularity").set_value("D/8").run()
    at.toggle(key="adaptive").set_value(True).run()
    assert at.radio(key="gate").value == "label vote" and not at.slider(key="vote").disabled
    assert at.slider(key="margin").disabled
    at.slider(key="vote").set_value(0.1).run()  # the top-1 result always agrees with itself: never escalates
    assert not at.exception and float(_metric(at, "Query MFLOPs")) == pytest.approx(small, abs=0.05)
    assert "**adaptive D/8->D if vote@10<0.1**" in " ".join(c.value for c in at.caption)
    at.slider(key="vote").set_value(1.0).run()  # escalates unless all ten results share the top-1's label
    from retrieval.search import Searcher

    with Searcher(app_env.index_dir, app_env.model_dir) as searcher:
        top10 = searcher.search([app_env.store.load_image(item)], "D/8", k=10)[0]
    escalated = len(set(top10.labels)) > 1
    assert float(_metric(at, "Query MFLOPs")) == pytest.approx(small + escalated * large, abs=0.05)
    assert any(("`D/8 → D` (escalated)" if escalated else "`D/8`") in md.value for md in at.markdown)
    assert len(_hits(at)) == DEFAULT_K

    at.toggle(key="funnel").set_value(True).run()
    assert at.radio(key="rerank").value == "all queries" and at.radio(key="gate").disabled
    at.radio(key="rerank").set_value("uncertain queries").run()
    at.slider(key="vote").set_value(0.1).run()
    assert not at.exception and float(_metric(at, "Query MFLOPs")) == pytest.approx(small, abs=0.05)
    assert "**funnel D/8->D @100 if vote@10<0.1**" in " ".join(c.value for c in at.caption)
    at.radio(key="gate").set_value("score margin").run()
    at.slider(key="margin").set_value(0.2).run()
    assert "**funnel D/8->D @100 if margin<0.2**" in " ".join(c.value for c in at.caption)


def test_budget_picks_the_frontier_configuration(app_env):
    at = _open_app()
    _pick(at)
    at.radio(key="encoder_mode").set_value("Budget (Mix'n'Match)").run()
    assert not at.exception
    cheapest, middle, full = app_env.points
    assert at.radio(key="granularity").disabled
    slider = at.slider(key="budget_MFLOPs")
    assert slider.min == pytest.approx(cheapest.query_mflops) and slider.max == pytest.approx(full.query_mflops)
    assert "**D**" in at.success[0].value
    slider.set_value((middle.query_mflops + full.query_mflops) / 2).run()
    assert "**mnm:32,16**" in at.success[0].value
    assert float(_metric(at, "Query MFLOPs")) == pytest.approx(middle.query_mflops, abs=0.05)
    assert any("`mnm:32,16`" in md.value for md in at.markdown)
    at.slider(key="budget_MFLOPs").set_value(cheapest.query_mflops).run()
    assert "**D/8**" in at.success[0].value

    at.radio(key="budget_unit").set_value("ms").run()
    at.slider(key="budget_ms").set_value(0.9).run()
    assert "**mnm:32,16**" in at.success[0].value and "a test" in " ".join(c.value for c in at.caption)


def test_budget_without_a_frontier_says_so(app_env, monkeypatch):
    monkeypatch.setenv("MATSEARCH_APP_MODEL", str(app_env.no_frontier))
    at = _open_app()
    at.radio(key="encoder_mode").set_value("Budget (Mix'n'Match)").run()
    assert not at.exception
    assert any("No Mix'n'Match budget frontier" in i.value and "evaluation.frontier" in i.value for i in at.info)
    assert not at.radio(key="granularity").disabled  # the granularity is used instead
    _pick(at)
    assert len(_hits(at)) == DEFAULT_K


def test_accuracy_vs_cost_chart_marks_the_current_setting(app_env, monkeypatch):
    at = _open_app()
    charts = at.get("vega_lite_chart")
    assert len(charts) == 1 and '"shape": "diamond"' in charts[0].proto.spec  # the ring round the current point
    caption = " ".join(c.value for c in at.caption)
    assert "retrieval_eval.json" in caption and "**D** is the ringed point" in caption
    at.radio(key="granularity").set_value("D/4").run()
    assert "**D/4** is the ringed point" in " ".join(c.value for c in at.caption)
    at.toggle(key="funnel").set_value(True).run()
    assert "was not evaluated" in " ".join(c.value for c in at.caption)
    assert '"shape": "diamond"' not in at.get("vega_lite_chart")[0].proto.spec  # only the dashed line

    monkeypatch.setenv("MATSEARCH_APP_EVAL_JSON", str(app_env.root / "missing.json"))
    at = _open_app()
    assert not at.get("vega_lite_chart") and any("No evaluation results" in i.value for i in at.info)


def test_chart_measured_elsewhere_is_labelled_with_its_dataset(app_env, monkeypatch, tmp_path):
    """An index of other images (a folder made here) gets no unlabelled Fashion-MNIST chart."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"p{i:02d}.png")
    build_index(str(folder), tmp_path / "index", model_dir=app_env.model_dir, progress=False, device="cpu")
    monkeypatch.setenv("MATSEARCH_APP_INDEX", str(tmp_path / "index"))
    at = _open_app()
    assert not at.exception
    headings = [h.value for h in at.subheader]
    assert any(h.startswith("Accuracy vs cost") and "Fashion-MNIST train, not on this index" in h for h in headings)
    note = " ".join(i.value for i in at.info)
    assert "Fashion-MNIST train images as the database" in note and "not on this index" in note
    assert str(folder) in note
    charts = at.get("vega_lite_chart")  # the chart carries its dataset in its own title
    assert len(charts) == 1 and "Fashion-MNIST train images" in charts[0].proto.spec
    assert "not this index" in charts[0].proto.spec
    assert "not on this index" in " ".join(c.value for c in at.caption)

    # the same Fashion-MNIST source but another database size than the evaluation's: not this index either
    records = json.loads((app_env.model_dir / "retrieval_eval.json").read_text())
    sized = tmp_path / "eval.json"
    sized.write_text(json.dumps([{**r, "database": 60_000, "queries": 10_000,
                                  "database_source": "fashion-mnist:train"} for r in records]))
    monkeypatch.setenv("MATSEARCH_APP_INDEX", str(app_env.index_dir))
    monkeypatch.setenv("MATSEARCH_APP_EVAL_JSON", str(sized))
    at = _open_app()
    assert "60,000 Fashion-MNIST train images" in " ".join(i.value for i in at.info)
    sized.write_text(json.dumps([{**r, "database": N_INDEX, "database_source": "fashion-mnist:train"}
                                 for r in records]))
    at = _open_app()  # measured on this very index: the chart, no note
    assert at.subheader[-1].value == "Accuracy vs cost" and not any("not on this index" in i.value for i in at.info)
    assert "on this index" in " ".join(c.value for c in at.caption)


def test_missing_or_damaged_index_is_an_error_message(app_env, monkeypatch, tmp_path):
    monkeypatch.setenv("MATSEARCH_APP_INDEX", str(tmp_path / "nowhere"))
    at = _open_app()
    assert "There is no index" in at.error[0].value and "matsearch index build" in at.error[0].value

    damaged = tmp_path / "damaged"
    shutil.copytree(app_env.index_dir, damaged)
    (damaged / "v000001" / "index.faiss").write_bytes(b"garbage")
    monkeypatch.setenv("MATSEARCH_APP_INDEX", str(damaged))
    at = _open_app()
    assert "Cannot open the index" in at.error[0].value and "FAISS" in at.error[0].value


def test_default_index_is_built_in_the_page_when_missing(app_data, monkeypatch, tmp_path):
    for name in APP_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MATSEARCH_APP_MODEL", str(app_data.model_dir))
    monkeypatch.setenv("MATSEARCH_APP_LIMIT", "96")
    at = _open_app(timeout=120)
    assert (tmp_path / "indexes" / "fashion-mnist-train" / "CURRENT").is_file()
    assert len(IndexStore.open(tmp_path / "indexes" / "fashion-mnist-train", device="cpu")) == 96
    assert len(_gallery_ids(at)) == 16 and "96 images" in at.caption[0].value
    _pick(at)
    assert len(_hits(at)) == DEFAULT_K


def test_default_index_build_failure_is_a_message_with_a_retry(app_data, monkeypatch, tmp_path):
    from index import build as build_module

    for name in APP_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MATSEARCH_APP_LIMIT", "32")

    def no_data(*args, **kwargs):
        raise FileNotFoundError("Fashion-MNIST files not found: install dataset-fashion-mnist")

    monkeypatch.setattr(build_module, "build_index", no_data)
    at = _open_app()
    assert "Building the index failed" in at.error[0].value and "dataset-fashion-mnist" in at.error[0].value
    assert at.button[0].label == "Try again"
    at.button[0].click().run()  # tries again (and fails again, here): still a message, not a traceback
    assert not at.exception and "Building the index failed" in at.error[0].value


def test_ten_threads_share_one_searcher_safely(app_env):
    """What ten sessions searching at once do on the server: the same cached searcher, from ten threads.

    (AppTest itself cannot run in several threads at once: it swaps a process-wide mock runtime per run. The
    browser test below drives ten real sessions against one server.)"""
    from app import engine
    from app.settings import from_argv
    from retrieval.submodel import Submodel

    searcher = engine.open_searcher(from_argv([]))
    store = searcher.store
    jobs = [(item, Submodel(level=(1, 2, 4, 8)[item % 4])) for item in range(10)]

    def run(item: int, submodel) -> tuple[list[int], float, bytes]:
        query = engine.Query(f"#{item}", store.load_image(item), exclude_id=item)
        outcome = engine.search(searcher, [query], submodel, DEFAULT_K, label_filter=[item % 10])[0]
        thumbs = b"".join(engine.png_bytes(engine.thumbnail(store.load_image(h.id))) for h in outcome.hits[:3])
        return [h.id for h in outcome.hits], outcome.mflops, thumbs

    reference = {item: run(item, sub) for item, sub in jobs}
    results, errors = {}, []
    barrier = threading.Barrier(len(jobs))

    def session(item: int, submodel) -> None:
        try:
            barrier.wait(timeout=30)
            for _ in range(3):
                results[item] = run(item, submodel)
        except Exception as e:  # reported below with the others
            errors.append(f"{item}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=session, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert results == reference
    assert all(len(ids) == DEFAULT_K for ids, _, _ in results.values())


# -- the launcher -----------------------------------------------------------------------------------------------------
def test_launcher_passes_options_to_the_page(tmp_path):
    from app import launch, settings
    from app.cli import build_parser

    args = build_parser("app").parse_args(["app", "--index", str(tmp_path / "idx"), "--model", "m", "--limit", "500",
                                           "--port", "8642", "--eval-json", "e.json", "--max-upload-mb", "3"])
    command = launch.streamlit_command(args)
    assert command[1:4] == ["-m", "streamlit", "run"] and Path(command[4]) == APP_SCRIPT
    assert "--server.port=8642" in command and "--server.headless=true" in command
    page_args = command[command.index("--") + 1:]
    s = settings.from_argv(page_args, environ={})
    assert (s.index_dir, s.model_dir, s.eval_json) == (tmp_path / "idx", Path("m"), Path("e.json"))
    assert s.default_limit == 500 and s.max_upload_bytes == 3 * 2 ** 20 and not s.is_default_index

    defaults = settings.from_argv([], environ={"MATSEARCH_APP_LIMIT": "2000"})
    assert defaults.index_dir == settings.DEFAULT_INDEX_DIR and defaults.is_default_index
    assert defaults.default_limit == 2000 and defaults.device == "cpu"
    assert settings.from_argv(["--limit", "7"], environ={"MATSEARCH_APP_LIMIT": "2000"}).default_limit == 7
    with pytest.raises(ValueError, match="--limit"):
        launch.streamlit_command(build_parser("app").parse_args(["app", "--limit", "0"]))


# -- the real server in headless Chromium -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(app_data):
    """`matsearch app` serving the test index on a free localhost port; stopped whatever happens."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) for browser tests")
    pytest.importorskip("playwright")
    from benchmarks.app_load import start_server, stop_server

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in APP_ENV}
    process, _ = start_server(app_data.index_dir, port, app_data.root / "server.log", app_data.model_dir, env=env,
                              cwd=app_data.root, timeout=60)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _metric_value(page, label: str) -> str:
    return page.locator('[data-testid="stMetric"]', has_text=label).first.locator(
        '[data-testid="stMetricValue"]').inner_text().strip()


def _wait_until_done(page, timeout: float = 60_000) -> None:
    """Until the script run has finished and every element on the page is from it (none left stale)."""
    page.wait_for_function(
        """() => !document.querySelector('[data-testid="stStatusWidgetRunningIcon"]')
                 && !document.querySelector('[data-testid="stStatusWidgetRunningManIcon"]')
                 && !document.querySelector('[data-stale="true"]')""", timeout=timeout)


def _upload(page, path: Path) -> None:
    page.wait_for_selector('[data-testid="stFileUploaderDropzoneInput"]', state="attached", timeout=60_000)
    page.set_input_files('[data-testid="stFileUploaderDropzoneInput"]', str(path))


@pytest.mark.browser
def test_browser_upload_results_granularity_and_latency(server, browser, app_data, tmp_path):
    query = tmp_path / "query.png"
    query.write_bytes(_test_image_png(0))
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    try:
        page.goto(server)
        _upload(page, query)
        hits = page.locator('[class*="st-key-hit-0-"]')
        hits.nth(DEFAULT_K - 1).wait_for(timeout=60_000)
        _wait_until_done(page)
        assert hits.count() == DEFAULT_K
        for rank in range(1, DEFAULT_K + 1):
            text = page.locator(f".st-key-hit-0-{rank}").inner_text()
            assert f"#{rank}" in text and re.search(r"score\s+-?\d\.\d{3}", text), text
            assert page.locator(f".st-key-hit-0-{rank} img").count() == 1
        before = [page.locator(f".st-key-hit-0-{rank}").inner_text() for rank in range(1, DEFAULT_K + 1)]
        full = f"{_mflops(app_data.config, level=1):.1f}"
        assert _metric_value(page, "Query MFLOPs") == full

        page.get_by_test_id("stSidebarUserContent").get_by_text("D/8", exact=True).click()
        small = f"{_mflops(app_data.config, level=8):.1f}"
        page.wait_for_function(
            """value => [...document.querySelectorAll('[data-testid="stMetric"]')].some(
                   m => m.innerText.includes('Query MFLOPs') && m.innerText.includes(value))""",
            arg=small, timeout=30_000)
        _wait_until_done(page)
        page.locator('[data-testid="stVegaLiteChart"]').first.wait_for(timeout=30_000)
        after = [page.locator(f".st-key-hit-0-{rank}").inner_text() for rank in range(1, DEFAULT_K + 1)]
        assert len(after) == DEFAULT_K and after != before  # a new search, all k results redrawn
        assert all(f"#{rank}" in text and "score" in text for rank, text in enumerate(after, 1))
        assert page.locator("code", has_text="D/8").count() >= 1
        panel = page.locator('[class*="st-key-latency-0"]').inner_text()
        for label in ("Query MFLOPs", "Decode (ms)", "Encode (ms)", "Search (ms)", "Rerank (ms)", "Total (ms)"):
            assert label in panel
            assert re.fullmatch(r"\d+\.\d", _metric_value(page, label)), label
        assert page.locator('[data-testid="stException"]').count() == 0
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app-browser.png"), full_page=True)
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)  # what the page looked like when it failed
        page.screenshot(path=str(ARTIFACTS / "app-browser-failure.png"), full_page=True)
        raise
    finally:
        page.close()


@pytest.mark.browser
def test_browser_a_search_redraws_only_the_search_part(server, browser, tmp_path):
    """A new query (here "More like this" after an upload) reruns the query inputs, results and chart; the
    sidebar and the header are left as they are."""
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    try:
        page.goto(server)
        query = tmp_path / "query.png"
        query.write_bytes(_test_image_png(1))
        _upload(page, query)
        page.locator('[class*="st-key-hit-0-"]').nth(DEFAULT_K - 1).wait_for(timeout=60_000)
        _wait_until_done(page)
        assert "query.png" in page.locator(".st-key-query-0").inner_text()
        page.evaluate("""() => {
            window.changes = {sidebar: 0, header: 0};
            const watch = (node, part) => new MutationObserver(m => { window.changes[part] += m.length; })
                .observe(node, {subtree: true, childList: true, attributes: true, characterData: true});
            watch(document.querySelector('[data-testid="stSidebarUserContent"]'), 'sidebar');
            watch(document.querySelector('h1').closest('[data-testid="stElementContainer"]'), 'header');
        }""")
        page.locator(".st-key-hit-0-1").get_by_role("button", name="More like this").click()
        page.wait_for_function("() => document.querySelector('.st-key-query-0')?.innerText.includes('database #')",
                               timeout=60_000)
        page.locator('[class*="st-key-hit-0-"]').nth(DEFAULT_K - 1).wait_for(timeout=60_000)
        _wait_until_done(page)
        assert page.locator('[class*="st-key-hit-0-"]').count() == DEFAULT_K
        assert page.evaluate("window.changes") == {"sidebar": 0, "header": 0}

        # the database tab draws its images when it is chosen; a pick from it searches, the sidebar still unchanged
        assert page.locator('[class*="st-key-gallery-"]').count() == 0
        page.get_by_role("tab", name="Pick from the database").click()
        page.locator('[class*="st-key-gallery-"] img').nth(15).wait_for(timeout=60_000)
        _wait_until_done(page)
        picked = page.locator('[class*="st-key-gallery-"]').first
        item = re.search(r"st-key-gallery-(\d+)", picked.get_attribute("class")).group(1)
        picked.get_by_role("button", name="Search").click()
        page.wait_for_function("id => document.querySelector('.st-key-query-0')?.innerText.includes('database #' + id)",
                               arg=item, timeout=60_000)
        _wait_until_done(page)
        assert page.locator('[class*="st-key-hit-0-"]').count() == DEFAULT_K
        assert page.evaluate("window.changes") == {"sidebar": 0, "header": 0}
    finally:
        page.close()


@pytest.mark.browser
def test_browser_ten_sessions_at_once(server, browser, tmp_path):
    pages = []
    try:
        for i in range(10):  # ten browser contexts: ten Streamlit sessions on the one server
            context = browser.new_context(viewport={"width": 1200, "height": 900})
            page = context.new_page()
            page.goto(server)
            pages.append(page)
        for i, page in enumerate(pages):
            path = tmp_path / f"q{i}.png"
            path.write_bytes(_test_image_png(i))
            _upload(page, path)  # each starts a search; they run on the server together
        for page in pages:
            page.locator('[class*="st-key-hit-0-"]').nth(DEFAULT_K - 1).wait_for(timeout=90_000)
            _wait_until_done(page)
            assert page.locator('[class*="st-key-hit-0-"]').count() == DEFAULT_K
            assert page.locator('[data-testid="stException"]').count() == 0
    finally:
        for page in pages:
            page.context.close()
