"""The retrieval package on real FAISS, small random models and small Fashion-MNIST subsets (CPU, well under 90 s)."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vision_model
from conftest import save_small_model
from index import build_index
from retrieval import knn, metrics
from retrieval.adaptive import Adaptive, calibrate_margin, held_out_margins
from retrieval.budget import Frontier, FrontierPoint, compute_frontier, pareto_front, search_frontier, seed_configs
from retrieval.cli import main
from retrieval.datasets import fashion_mnist, fashion_mnist_rows
from retrieval.encoder import UnreadableQuery
from retrieval.funnel import Funnel
from retrieval.search import ModelMismatchError, Searcher
from retrieval.submodel import Submodel

DB_SIZE = 300
D, D8 = Submodel(level=1), Submodel(level=8)


# -- fixtures ------------------------------------------------------------------------------------------------------
def _save_model(directory: Path, seed: int) -> Path:
    # spread-out embeddings: near-ties would make rankings depend on float rounding
    return save_small_model(directory, seed, init_std=0.3, dtype=None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("model"), seed=0)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("other-model"), seed=1)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, model_dir) -> Path:
    out = tmp_path_factory.mktemp("index") / "fmnist-train"
    build_index("fashion-mnist:train", out, model_dir=model_dir, limit=DB_SIZE, device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def searcher(index_dir) -> Searcher:
    with Searcher(index_dir) as s:
        yield s


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    return fashion_mnist("test")[0][:24]  # uint8 (24, 1, 28, 28)


def _pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(img[0].numpy()) for img in images]


def _assert_same_ranking(scores_a, ids_a, scores_b, ids_b, tie=1e-5):
    """Equal scores, and equal ids wherever a result is not within `tie` of a neighbour (float rounding)."""
    np.testing.assert_allclose(scores_a, scores_b, atol=tie)
    gaps = np.abs(np.diff(scores_b, axis=1))
    clear = np.ones_like(scores_b, dtype=bool)
    clear[:, 1:] &= gaps > tie
    clear[:, :-1] &= gaps > tie
    np.testing.assert_array_equal(np.where(clear, ids_a, -7), np.where(clear, ids_b, -7))


def _stack(results) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([r.scores for r in results]), np.stack([r.ids for r in results])


# -- submodels -----------------------------------------------------------------------------------------------------
def test_submodel_names_parse_and_cost(model_dir):
    config = vision_model.from_pretrained(model_dir).config
    assert [Submodel.parse(t).name for t in ("D", "d/4", "8", "mnm:64,32", "64,32")] == \
        ["D", "D/4", "D/8", "mnm:64,32", "mnm:64,32"]
    assert Submodel() == Submodel(level=1) == Submodel.coerce(None) == Submodel.coerce("D")
    assert Submodel(widths=(32, 32)).canonical(config) == Submodel(level=2)
    assert Submodel.from_dict(Submodel(widths=(64, 8)).to_dict()) == Submodel(widths=(64, 8))
    assert D8.flops(config) < Submodel(widths=(64, 8)).flops(config) < D.flops(config)
    assert D.flops(config) == vision_model.submodel_cost(config, level=1, include_head=False).flops
    with pytest.raises(ValueError, match="cannot read submodel"):
        Submodel.parse("D/x")
    with pytest.raises(ValueError):
        Submodel(widths=(64, 8, 8)).resolve(config)  # one width per layer
    funnel = Funnel.parse("mnm:8,8:D:50", margin=0.1)
    assert (funnel.small, funnel.large, funnel.shortlist, funnel.rerank_when) == \
        (Submodel(widths=(8, 8)), D, 50, "margin")
    assert Adaptive.parse("D/8:1:0.02") == Adaptive(D8, D, 0.02)
    with pytest.raises(ValueError, match="SMALL:LARGE:SHORTLIST"):
        Funnel.parse("8:1")


# -- encoder and plain search --------------------------------------------------------------------------------------
def test_encoder_accepts_pil_files_bytes_arrays_and_tensors(searcher, test_images, tmp_path):
    encoder = searcher.encoder
    path = tmp_path / "query.png"
    _pil(test_images[:1])[0].save(path)
    from_array = encoder.encode(test_images[:2], "D/2")
    assert from_array.embeddings.shape == (2, 64) and from_array.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(from_array.embeddings, axis=1), 1.0, atol=1e-5)
    assert set(from_array.timings) == {"decode", "encode"}
    for query in (_pil(test_images[:1]), path, str(path), path.read_bytes()):
        np.testing.assert_allclose(encoder.encode(query, "D/2").embeddings[0], from_array.embeddings[0], atol=1e-5)
    with pytest.raises(UnreadableQuery, match="not a recognised image"):
        encoder.encode(b"not an image", "D")


def test_search_returns_k_sorted_results_with_metadata_timings_and_cost(searcher, test_images):
    results = searcher.search(_pil(test_images[:4]), "D/4", k=7)
    assert len(results) == 4
    for r in results:
        assert len(r.ids) == len(r.scores) == len(r.metadata) == 7
        assert np.all(np.diff(r.scores) <= 0)
        assert [m["id"] for m in r.metadata] == r.ids.tolist()
        assert all(m["key"].startswith("fashion-mnist:train/") for m in r.metadata)
        assert set(r.timings) == {"decode", "encode", "search", "rerank"} and min(r.timings.values()) >= 0
        assert r.mflops == pytest.approx(searcher.mflops("D/4")) and r.submodels == ["D/4"] and not r.escalated
    json.dumps(results[0].to_dict())  # JSON-ready for the CLI and UI


def test_label_filter_and_score_threshold(searcher, test_images):
    only = searcher.search(test_images[:3], "D", k=5, label_filter=["Sneaker", 9])
    for r in only:
        assert {m["label_name"] for m in r.metadata} <= {"Sneaker", "Ankle boot"} and len(r.ids) == 5
    everything = searcher.search(test_images[:3], "D", k=10)
    threshold = float(np.median(everything[0].scores))
    kept = searcher.search(test_images[:3], "D", k=10, score_threshold=threshold)[0]
    assert 0 < len(kept.ids) < 10 and np.all(kept.scores >= threshold)
    with pytest.raises(ValueError, match="unknown label"):
        searcher.search(test_images[:1], "D", label_filter=["Spaceship"])


def test_another_model_is_refused_naming_both(index_dir, model_dir, other_model_dir):
    with pytest.raises(ModelMismatchError) as error:
        Searcher(index_dir, other_model_dir)
    message = str(error.value)
    assert str(other_model_dir) in message and str(Path(model_dir).resolve()) in message
    assert vision_model.weights_hash(other_model_dir)[:16] in message
    assert vision_model.weights_hash(model_dir)[:16] in message
    copy = shutil.copytree(model_dir, Path(other_model_dir).parent / "same-weights")
    Searcher(index_dir, copy).close()  # the same weights elsewhere are fine


# -- funnel and adaptive -------------------------------------------------------------------------------------------
def test_funnel_with_the_whole_database_as_shortlist_equals_plain_large_search(searcher, test_images):
    funnel = searcher.search(test_images, k=10, funnel=Funnel(D8, D, shortlist=DB_SIZE))
    plain = searcher.search(test_images, D, k=10)
    _assert_same_ranking(*_stack(funnel), *_stack(plain))
    assert all(r.escalated and r.submodels == ["D/8", "D"] for r in funnel)
    assert funnel[0].mflops == pytest.approx(searcher.mflops(D8) + searcher.mflops(D))
    assert funnel[0].timings["rerank"] > 0


def test_margin_gated_funnel_reranks_none_at_zero_and_all_at_inf(searcher, test_images):
    never = searcher.search(test_images, k=5, funnel=Funnel(D8, D, 50, "margin", 0.0))
    small = searcher.search(test_images, D8, k=5)
    _assert_same_ranking(*_stack(never), *_stack(small))
    assert not any(r.escalated for r in never)
    assert all(r.mflops == pytest.approx(searcher.mflops(D8)) and r.timings["rerank"] == 0 for r in never)

    always = searcher.search(test_images, k=5, funnel=Funnel(D8, D, 50, "margin", np.inf))
    reference = searcher.search(test_images, k=5, funnel=Funnel(D8, D, 50))
    _assert_same_ranking(*_stack(always), *_stack(reference))
    assert all(r.escalated and r.mflops == pytest.approx(searcher.mflops(D8) + searcher.mflops(D)) for r in always)


def test_adaptive_escalates_none_at_zero_and_all_at_inf(searcher, test_images):
    never = searcher.search(test_images, k=5, adaptive=Adaptive(D8, D, 0.0))
    _assert_same_ranking(*_stack(never), *_stack(searcher.search(test_images, D8, k=5)))
    assert not any(r.escalated for r in never) and never[0].mflops == pytest.approx(searcher.mflops(D8))

    always = searcher.search(test_images, k=5, adaptive=Adaptive(D8, D, np.inf))
    _assert_same_ranking(*_stack(always), *_stack(searcher.search(test_images, D, k=5)))
    assert all(r.escalated for r in always)
    assert always[0].mflops == pytest.approx(searcher.mflops(D8) + searcher.mflops(D))


def test_adaptive_in_between_escalates_the_uncertain_queries_and_costs_accordingly(searcher, test_images):
    pixels = searcher.encoder.to_pixels(test_images)
    margins = held_out_margins(searcher.store, searcher.encoder.embed(pixels, D8))
    threshold = calibrate_margin(margins, 0.5)
    results = searcher.search(test_images, k=5, adaptive=Adaptive(D8, D, threshold))
    escalated = np.array([r.escalated for r in results])
    np.testing.assert_array_equal(escalated, margins < threshold)
    assert escalated.mean() == pytest.approx(0.5, abs=0.1)
    mean_cost = np.mean([r.mflops for r in results])
    assert mean_cost == pytest.approx(searcher.mflops(D8) + escalated.mean() * searcher.mflops(D))
    assert searcher.mflops(D8) < mean_cost < searcher.mflops(D8) + searcher.mflops(D)


def test_calibration_hits_the_target_rate_and_leaves_own_matches_out():
    margins = np.linspace(0.0, 1.0, 101)
    for rate in (0.1, 0.3, 0.75):
        assert np.mean(margins < calibrate_margin(margins, rate)) == pytest.approx(rate, abs=0.011)
    assert calibrate_margin(margins, 0) == 0 and calibrate_margin(margins, 1) == np.inf
    with pytest.raises(ValueError):
        calibrate_margin(margins, 1.5)

    vectors = np.eye(4, dtype=np.float32)
    db = knn.InMemoryDatabase(vectors, np.arange(4))
    query = np.array([[1.0, 0.6, 0.2, 0.0]], dtype=np.float32)  # itself (row 0) first, then rows 1 and 2
    assert held_out_margins(db, query)[0] == pytest.approx(0.4)
    assert held_out_margins(db, query, exclude_ids=np.array([0]))[0] == pytest.approx(0.4)  # 0.6 - 0.2


# -- metrics on hand-made examples ---------------------------------------------------------------------------------
def test_metrics_on_hand_made_examples():
    query_labels = np.array([1, 2])
    result_labels = np.array([[1, 0, 1, 1],
                              [0, 2, 0, 0]])
    assert metrics.top1_accuracy(result_labels, query_labels) == 0.5
    # query 0: relevant at ranks 1, 3, 4: (1/1 + 2/3 + 3/4) / 3; query 1: relevant at rank 2: (1/2) / 1
    ap = metrics.average_precision_at_k(result_labels, query_labels, 4)
    np.testing.assert_allclose(ap, [(1 + 2 / 3 + 3 / 4) / 3, 0.5])
    # with R relevant items in the database the denominator is min(k, R)
    np.testing.assert_allclose(metrics.average_precision_at_k(result_labels, query_labels, 4, np.array([10, 2])),
                               [(1 + 2 / 3 + 3 / 4) / 4, 0.25])
    assert metrics.map_at_k(result_labels, query_labels, 1) == 0.5  # AP@1 is top-1 accuracy
    assert metrics.map_at_k(np.array([[3, 3]]), np.array([1]), 2) == 0.0  # nothing relevant

    ids = np.array([[5, 6, 7, -1], [1, 2, 3, 4]])
    reference = np.array([[7, 6, 9, 8], [1, 2, 3, 4]])
    assert metrics.recall_at_k(ids, reference, 4) == pytest.approx((2 / 4 + 1) / 2)
    assert metrics.recall_at_k(ids, reference, 1) == pytest.approx(0.5)
    np.testing.assert_array_equal(metrics.labels_of(np.array([[2, -1]]), np.array([7, 8, 9])), [[9, metrics.NO_LABEL]])
    np.testing.assert_array_equal(metrics.relevant_counts(np.array([0, 1, 1, -1]), np.array([1, 0])), [2, 1])


def test_rerank_and_filtered_search_are_exact():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    db = knn.InMemoryDatabase(vectors, np.arange(50) % 3)
    queries = vectors[:4] + 0.1
    scores = queries @ vectors.T
    allowed = np.flatnonzero(db.labels == 1)
    got_scores, got_ids = knn.search(db, queries, 5, allowed)
    expected = allowed[np.argsort(-scores[:, allowed], axis=1)[:, :5]]
    np.testing.assert_array_equal(got_ids, expected)
    candidates = np.array([[3, 9, -1, 20]] * 4)
    rerank_scores, rerank_ids = knn.rerank(db, queries, candidates, 4)
    assert (rerank_ids[:, -1] == -1).all() and np.isneginf(rerank_scores[:, -1]).all()
    np.testing.assert_allclose(rerank_scores[:, 0], scores[:, [3, 9, 20]].max(axis=1), rtol=1e-5)


# -- budget -> submodel --------------------------------------------------------------------------------------------
def _point(name_widths, top1, mflops, ms=1.0) -> FrontierPoint:
    return FrontierPoint(Submodel(widths=name_widths), top1, top1, mflops, ms)


def test_pareto_front_keeps_exactly_the_undominated_points():
    points = [_point((1,), 0.5, 10), _point((2,), 0.7, 20), _point((3,), 0.6, 25), _point((4,), 0.9, 40),
              _point((5,), 0.9, 45), _point((6,), 0.4, 10)]
    assert [p.submodel.widths for p in pareto_front(points)] == [(1,), (2,), (4,)]


def test_frontier_search_is_bounded_and_starts_from_trained_levels():
    config = vision_model.get_config("matmamba_vision_fmnist")  # depth 8: 4^8 configs
    seen = []

    def fake_evaluate(sub: Submodel) -> FrontierPoint:  # accuracy grows with width, more in late layers
        seen.append(sub)
        widths = np.array(sub.resolve(config))
        return FrontierPoint(sub, float((widths * np.arange(1, 9)).sum()), 0.0, sub.mflops(config), 0.0)

    evaluated = search_frontier(fake_evaluate, config, max_evaluations=30)
    assert len(evaluated) == len(seen) == len(set(seen)) == 30
    assert {Submodel(level=lv) for lv in (1, 2, 4, 8)} <= set(seen)
    assert len(seed_configs(config)) == 16


def test_frontier_is_pareto_selection_respects_budgets_and_is_stored(model_dir, tmp_path):
    directory = shutil.copytree(model_dir, tmp_path / "model")
    model = vision_model.from_pretrained(directory)
    queries, query_labels = fashion_mnist_rows(model, "train", slice(0, 40))
    db_pixels, db_labels = fashion_mnist_rows(model, "train", slice(40, 240))
    frontier = compute_frontier(model, queries, query_labels, db_pixels, db_labels, max_evaluations=10,
                                latency_queries=2)
    assert len(frontier.evaluated) == 10 and frontier.points
    for a in frontier.points:  # no frontier point is dominated by anything measured
        assert not any(b.query_mflops <= a.query_mflops and b.top1 >= a.top1 and
                       (b.query_mflops, b.top1) != (a.query_mflops, a.top1) for b in frontier.evaluated)
    mflops = sorted(p.query_mflops for p in frontier.points)
    budget = mflops[len(mflops) // 2]
    chosen = frontier.select(budget_mflops=budget)
    assert chosen.query_mflops <= budget
    assert chosen.top1 == max(p.top1 for p in frontier.points if p.query_mflops <= budget)
    assert frontier.select(budget_ms=1e9).top1 == max(p.top1 for p in frontier.points)
    with pytest.raises(ValueError, match="no submodel fits a budget of 0.5 MFLOPs"):
        frontier.select(budget_mflops=0.5)

    assert frontier.meta["weights_sha256"] == vision_model.weights_hash(directory)
    path = frontier.save(directory)
    assert path == directory / "pareto.json"
    loaded = Frontier.load(directory)
    assert loaded.points == frontier.points and loaded.select(budget_mflops=budget) == chosen
    frontier.meta["weights_sha256"] = "0" * 64
    frontier.save(directory)
    with pytest.raises(ValueError, match="other weights"):
        Frontier.load(directory)


def test_budget_flags_need_a_frontier(index_dir, tmp_path, capsys):
    image = tmp_path / "q.png"
    Image.new("L", (28, 28)).save(image)
    assert main(["search", "--index", str(index_dir), str(image), "--budget-mflops", "5"]) == 1
    assert "no budget frontier" in capsys.readouterr().err


# -- command lines -------------------------------------------------------------------------------------------------
def test_search_cli_reports_a_corrupt_file_and_answers_the_others(index_dir, test_images, tmp_path, capsys):
    good = tmp_path / "good.png"
    _pil(test_images[:1])[0].save(good)
    corrupt = tmp_path / "corrupt.jpg"
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(jpeg, "JPEG")
    corrupt.write_bytes(jpeg.getvalue()[:40])
    missing = tmp_path / "missing.png"

    rc = main(["search", "--index", str(index_dir), str(good), str(corrupt), str(missing), "--level", "4", "--k",
               "3"])
    out, err = capsys.readouterr()
    assert rc == 1
    errors = err.strip().splitlines()
    assert len(errors) == 2 and "corrupt.jpg" in errors[0] and "corrupt or truncated" in errors[0]
    assert "missing.png" in errors[1] and "cannot read file" in errors[1]
    assert "good.png" in out and "D/4" in out and "fashion-mnist:train/" in out

    rc = main(["search", "--index", str(index_dir), str(good), "--funnel", "8:1:50", "--k", "3", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["errors"] == [] and len(doc["results"][0]["ids"]) == 3
    assert doc["results"][0]["submodels"] == ["D/8", "D"] and doc["mode"].startswith("funnel")
    with pytest.raises(SystemExit):  # one mode at a time: argparse refuses
        main(["search", "--index", str(index_dir), str(good), "--adaptive", "D/8:D:inf", "--widths", "8,8"])


REQUIRED_KEYS = {"setting", "top1", "map@10", "map@100", "recall@10", "query_mflops", "latency_ms"}


def test_eval_cli_end_to_end(index_dir, model_dir, other_model_dir, tmp_path, capsys):
    out = tmp_path
    rc = main(["eval", "--json", str(out / "r.json"), "--model", str(model_dir), "--index", str(index_dir),
               "--limit-queries", "60", "--markdown", str(out / "r.md"), "--plot", str(out / "r.png"),
               "--control-model", str(other_model_dir), "--latency-queries", "2", "--shortlist", "40"])
    assert rc == 0, capsys.readouterr().err
    records = json.loads((out / "r.json").read_text())
    assert all(REQUIRED_KEYS <= set(r) for r in records)
    kinds = [r["kind"] for r in records]
    assert [r["setting"] for r in records[:4]] == ["D", "D/2", "D/4", "D/8"]
    assert kinds.count("mix'n'match") >= 6 and kinds.count("funnel") == 3 and kinds.count("adaptive") == 2
    assert kinds[-1] == "control"
    full = records[0]
    assert full["recall@10"] == 1.0 and full["query_mflops"] == pytest.approx(Searcher(index_dir).mflops("D"))
    for r in records:
        assert 0 <= r["top1"] <= 1 and 0 <= r["map@100"] <= 1 and r["latency_ms"] > 0
    funnel_always = next(r for r in records if r["kind"] == "funnel")
    assert funnel_always["escalation_rate"] == 1.0
    assert funnel_always["query_mflops"] == pytest.approx(records[0]["query_mflops"] + records[3]["query_mflops"])
    markdown = (out / "r.md").read_text()
    assert "| setting |" in markdown and markdown.count("\n| ") >= len(records)
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_refuses_a_wrong_control_folder_before_encoding_anything(model_dir, tmp_path, capsys):
    rc = main(["eval", "--json", str(tmp_path / "r.json"), "--model", str(model_dir),
               "--control-model", str(tmp_path / "no_model_here")])
    captured = capsys.readouterr()
    assert rc != 0 and "no_model_here" in captured.err and "encoding" not in captured.out
    assert not (tmp_path / "r.json").exists()


def test_demo_runs_on_a_small_index(model_dir, tmp_path, capsys):
    rc = main(["demo", "--model", str(model_dir), "--index", str(tmp_path / "idx"), "--limit", "120",
               "--queries", "30", "--examples", "1", "--k", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "built" in out and "1-NN accuracy on 30 test queries against 120 train images" in out
    for name in ("D ", "D/2", "D/4", "D/8", "funnel D/8->D"):
        assert name in out
    rc = main(["demo", "--model", str(model_dir), "--index", str(tmp_path / "idx"), "--limit", "100",
               "--queries", "10", "--examples", "0"])
    assert rc == 0 and "reusing" in capsys.readouterr().out
