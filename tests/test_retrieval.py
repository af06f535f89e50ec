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
from retrieval import knn
from evaluation import metrics
from retrieval.cascade import Adaptive, Cascade, Funnel, cascade_search
from evaluation.frontier import compute_frontier, search_frontier, seed_configs
from retrieval.budget import Frontier, FrontierPoint, pareto_front
from app.cli import main
from evaluation.datasets import fashion_mnist, fashion_mnist_rows
from retrieval.encoder import UnreadableQuery
from retrieval.gate import Gate, calibrate_margin, calibrate_vote, held_out_margins, held_out_votes, vote_fractions
from retrieval.staged import StageTimer
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
    funnel = Cascade.parse_funnel("mnm:8,8:D:50", margin=0.1)
    assert (funnel.small, funnel.large, funnel.shortlist, funnel.stage2, funnel.gate) == \
        (Submodel(widths=(8, 8)), D, 50, "rerank", Gate("margin", 0.1))
    assert Cascade.parse_adaptive("D/8:1:0.02") == Adaptive(D8, D, 0.02)
    with pytest.raises(ValueError, match="SMALL:LARGE:SHORTLIST"):
        Cascade.parse_funnel("8:1")


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
    funnel = searcher.search(test_images, k=10, cascade=Funnel(D8, D, shortlist=DB_SIZE))
    plain = searcher.search(test_images, D, k=10)
    _assert_same_ranking(*_stack(funnel), *_stack(plain))
    assert all(r.escalated and r.submodels == ["D/8", "D"] for r in funnel)
    assert funnel[0].mflops == pytest.approx(searcher.mflops(D8) + searcher.mflops(D))
    assert funnel[0].timings["rerank"] > 0


def test_margin_gated_funnel_reranks_none_at_zero_and_all_at_inf(searcher, test_images):
    never = searcher.search(test_images, k=5, cascade=Funnel(D8, D, 50, "margin", 0.0))
    small = searcher.search(test_images, D8, k=5)
    _assert_same_ranking(*_stack(never), *_stack(small))
    assert not any(r.escalated for r in never)
    assert all(r.mflops == pytest.approx(searcher.mflops(D8)) and r.timings["rerank"] == 0 for r in never)

    always = searcher.search(test_images, k=5, cascade=Funnel(D8, D, 50, "margin", np.inf))
    reference = searcher.search(test_images, k=5, cascade=Funnel(D8, D, 50))
    _assert_same_ranking(*_stack(always), *_stack(reference))
    assert all(r.escalated and r.mflops == pytest.approx(searcher.mflops(D8) + searcher.mflops(D)) for r in always)


def test_adaptive_escalates_none_at_zero_and_all_at_inf(searcher, test_images):
    never = searcher.search(test_images, k=5, cascade=Adaptive(D8, D, 0.0))
    _assert_same_ranking(*_stack(never), *_stack(searcher.search(test_images, D8, k=5)))
    assert not any(r.escalated for r in never) and never[0].mflops == pytest.approx(searcher.mflops(D8))

    always = searcher.search(test_images, k=5, cascade=Adaptive(D8, D, np.inf))
    _assert_same_ranking(*_stack(always), *_stack(searcher.search(test_images, D, k=5)))
    assert all(r.escalated for r in always)
    assert always[0].mflops == pytest.approx(searcher.mflops(D8) + searcher.mflops(D))


def test_adaptive_in_between_escalates_the_uncertain_queries_and_costs_accordingly(searcher, test_images):
    pixels = searcher.encoder.to_pixels(test_images)
    margins = held_out_margins(searcher.store, searcher.encoder.embed(pixels, D8))
    threshold = calibrate_margin(margins, 0.5)
    results = searcher.search(test_images, k=5, cascade=Adaptive(D8, D, threshold))
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


# -- the label-vote gate ------------------------------------------------------------------------------------------
# A hand-built database: query g (the unit vector e_g) has exactly the ten items of group g as its top 10, in
# order (score cos(theta_j) falling with j; items of other groups score 0). Labels decide the agreeing share.
GROUP_LABELS = {  # labels of group g's items, best first -> share agreeing with the top-1 item's label
    0: [3] * 10,  # 1.0
    1: [1, 2, 1, 2, 1, 1, 2, 1, 2, 1],  # 0.6, the agreeing ones not a prefix
    2: [4, 4, 5, 5, 4, 5, 4, 5, 4, 5],  # 0.5
    3: [7, 6, 6, 6, 6, 6, 6, 6, 6, 6],  # 0.1: only the top-1 itself
    4: [-1] * 10,  # an unlabelled top-1: nothing to agree with, 0.0
}
GROUP_SHARES = np.array([1.0, 0.6, 0.5, 0.1, 0.0])


def _voting_database() -> tuple[knn.InMemoryDatabase, np.ndarray]:
    groups, per_group = len(GROUP_LABELS), 10
    dim = groups + groups * per_group
    vectors, labels = np.zeros((groups * per_group, dim), np.float32), []
    for g, group_labels in GROUP_LABELS.items():
        for j in range(per_group):
            theta = 0.1 + 0.08 * j
            vectors[g * per_group + j, g] = np.cos(theta)
            vectors[g * per_group + j, groups + g * per_group + j] = np.sin(theta)  # a direction of its own
        labels += group_labels
    rng = np.random.default_rng(0)
    order = rng.permutation(len(vectors))  # ids shuffled: the gate must follow ids, not positions
    queries = np.eye(groups, dim, dtype=np.float32)
    return knn.InMemoryDatabase(vectors[order], np.array(labels)[order]), queries


def _staged(db, queries, staged, k=3):
    large_queries = -queries  # the large submodel's embedding: far from the small one's, to tell results apart
    embed_calls = []

    def embed(sub: Submodel, rows: np.ndarray) -> np.ndarray:
        embed_calls.append((sub, rows.tolist()))
        return (queries if sub == D8 else large_queries)[rows]

    config = vision_model.get_config("matmamba_vision_fmnist")
    return cascade_search(db, embed, len(queries), staged, k, config, StageTimer()), embed_calls, config, large_queries


@pytest.mark.parametrize("threshold, escalated", [
    (1.0, [False, True, True, True, True]),
    (0.6, [False, False, True, True, True]),  # share 0.6 is not below 0.6
    (0.1 * 6, [False, False, True, True, True]),  # rounding: 0.6000000000000001 still counts as 6 votes of 10
    (0.55, [False, False, True, True, True]),
    (0.5, [False, False, False, True, True]),
    (0.1, [False, False, False, False, True]),  # the unlabelled top-1 alone
])
def test_vote_gate_escalates_exactly_the_queries_whose_neighbourhood_disagrees(threshold, escalated):
    db, queries = _voting_database()
    _, ids = db.search(queries, 10)
    np.testing.assert_allclose(vote_fractions(db, ids), GROUP_SHARES)
    for staged in (Adaptive(D8, D, gate="vote", vote=threshold), Funnel(D8, D, 20, "vote", vote=threshold)):
        result, calls, config, large_queries = _staged(db, queries, staged)
        np.testing.assert_array_equal(result.escalated, escalated)
        want = np.array(escalated)
        assert calls[0] == (D8, [0, 1, 2, 3, 4])  # the small submodel encodes every query ...
        assert calls[1:] == ([(D, np.flatnonzero(want).tolist())] if want.any() else [])  # ... the large the rest
        np.testing.assert_allclose(result.mflops, D8.mflops(config) + want * D.mflops(config))
        small_ids = db.search(queries, 3)[1]
        np.testing.assert_array_equal(result.ids[~want], small_ids[~want])
        if staged.kind == "adaptive" and want.any():  # escalated: searched again with the large embedding
            np.testing.assert_array_equal(result.ids[want], db.search(large_queries, 3)[1][want])
        label = "vote@10<" + f"{threshold:.3g}"
        assert staged.name.endswith(f"D/8->D if {label}") or staged.name.endswith(f"D/8->D @20 if {label}")


def test_vote_gate_counts_padding_as_disagreeing_and_needs_labels():
    vectors = np.eye(4, dtype=np.float32)
    db = knn.InMemoryDatabase(vectors, np.zeros(4, dtype=np.int64))  # 4 items, all one label: 4 votes of 10
    queries = np.array([[1.0, 0.5, 0.2, 0.1]], dtype=np.float32)
    for threshold, escalated in ((0.4, False), (0.5, True)):
        result, *_ = _staged(db, queries, Adaptive(D8, D, gate="vote", vote=threshold))
        assert result.escalated.tolist() == [escalated]
        result, *_ = _staged(db, queries, Funnel(D8, D, 3, "vote", vote=threshold))  # searches 10 for the vote
        assert result.escalated.tolist() == [escalated]
    result, *_ = _staged(db, queries, Adaptive(D8, D, gate="vote", vote=0.5, vote_k=4))
    assert result.escalated.tolist() == [False]  # four of four agree
    np.testing.assert_array_equal(knn.labels_of(db, np.array([[3, -1], [0, 2]])), [[0, -1], [0, 0]])

    unlabelled = knn.InMemoryDatabase(vectors)
    for staged in (Adaptive(D8, D, gate="vote"), Funnel(D8, D, 3, "vote")):
        with pytest.raises(ValueError, match="needs database labels.*margin gate"):
            _staged(unlabelled, queries, staged)
    with pytest.raises(ValueError, match="needs database labels"):
        held_out_votes(unlabelled, queries)
    result, *_ = _staged(unlabelled, queries, Adaptive(D8, D, margin=np.inf))  # the margin gate needs none
    assert result.escalated.tolist() == [True]


def test_gate_options_are_validated():
    for bad in (dict(gate="vote", vote=0.0), dict(gate="vote", vote=1.5), dict(gate="vote", vote_k=1),
                dict(gate="ballot"), dict(margin=-0.1)):
        with pytest.raises(ValueError):
            Adaptive(D8, D, **bad)
    for bad in (dict(rerank_when="vote", vote=0), dict(rerank_when="vote", vote_k=0), dict(rerank_when="never")):
        with pytest.raises(ValueError):
            Funnel(D8, D, 50, **bad)
    assert Funnel(D8, D, 50).gate is None and Funnel(D8, D, 50).name == "funnel D/8->D @50"
    assert Cascade.funnel(D8, D, 50, Gate("vote", 0.7, 20)) == Funnel(D8, D, 50, "vote", vote=0.7, vote_k=20)
    assert Cascade.adaptive(D8, D, Gate("vote", 0.7, 20)) == Adaptive(D8, D, gate="vote", vote=0.7, vote_k=20)
    assert Funnel(D8, D, 50).kind == "funnel" and Adaptive(D8, D).kind == "adaptive"
    for bad in (dict(stage2="search"), dict(stage2="skip"), dict(shortlist=0)):  # adaptive needs a gate
        with pytest.raises(ValueError):
            Cascade(D8, D, **{"gate": None, **bad})
    assert Funnel(D8, D, 50, "vote", vote=0.7, vote_k=20).name == "funnel D/8->D @50 if vote@20<0.7"
    assert Funnel(D8, D, 50, "margin", 0.02).name == "funnel D/8->D @50 if margin<0.02"
    assert Adaptive(D8, D, 0.02).name == "adaptive D/8->D if margin<0.02"
    assert Adaptive(D8, D, gate="vote").name == "adaptive D/8->D if vote@10<0.8"  # the default threshold
    assert Cascade.parse_adaptive("D/8:D:vote0.6") == Adaptive(D8, D, gate="vote", vote=0.6)
    assert Cascade.parse_adaptive("8:1:vote0.8", vote_k=5) == Adaptive(D8, D, gate="vote", vote=0.8, vote_k=5)
    assert Cascade.parse_adaptive("D/8:D:margin0.02") == Cascade.parse_adaptive("D/8:D:0.02") == Adaptive(D8, D, 0.02)
    assert Cascade.parse_funnel("D/8:D:100", vote=0.6) == Funnel(D8, D, 100, "vote", vote=0.6)
    with pytest.raises(ValueError, match="not both"):
        Cascade.parse_funnel("D/8:D:100", margin=0.1, vote=0.6)
    with pytest.raises(ValueError, match="names no threshold"):
        Cascade.parse_adaptive("D/8:D:vote")
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        Cascade.parse_adaptive("D/8:D:vote1.5")


def test_vote_calibration_hits_the_requested_rate():
    # agreeing counts of 1000 held-out queries; r_j = share with fewer than j votes of 10
    counts = np.repeat([10, 9, 8, 7, 6, 5, 3, 1], [700, 100, 50, 50, 40, 30, 20, 10])
    fractions = np.random.default_rng(0).permutation(counts) / 10
    rate_at = {j / 10: np.mean(counts < j) for j in range(1, 11)}  # 0, .01, .01, .03, .03, .06, .1, .15, .2, .3
    for target in (0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3):  # reachable rates are hit exactly
        threshold = calibrate_vote(fractions, target)
        assert np.mean(Gate("vote", threshold).escalate_statistic(fractions)) == pytest.approx(target)
        assert rate_at[threshold] == pytest.approx(target)
    assert calibrate_vote(fractions, 0.05) == 0.6  # 6%: closest, and at most a quarter over
    assert calibrate_vote(fractions, 0.12) == 0.7  # 10% is closer than 15%
    assert calibrate_vote(fractions, 0.047) == 0.4  # 6% is closer than 3%, but 28% over: too much
    assert calibrate_vote(fractions, 0.03) == 0.4  # 0.4 and 0.5 both escalate 3%: the smaller
    assert calibrate_vote(fractions, 0.25) == 0.9  # 20% and 30% tie: the cheaper one
    assert calibrate_vote(fractions, 0.0) == 0.1 and calibrate_vote(fractions, 1.0) == 1.0
    assert calibrate_vote(fractions * 10 / 20, 0.3, vote_k=20) == 0.5  # 20 voters: 10 of 20 < 10 for 30%
    with pytest.raises(ValueError):
        calibrate_vote(fractions, 1.5)

    db, queries = _voting_database()  # held out: own rows left out, as for the margins
    own = db.search(queries, 1)[1][:, 0]
    np.testing.assert_allclose(held_out_votes(db, queries), GROUP_SHARES)
    without_own = held_out_votes(db, queries, exclude_ids=own, vote_k=9)  # items 1..9 of each group
    np.testing.assert_allclose(without_own, [1.0, 4 / 9, 4 / 9, 1.0, 0.0])  # a new top-1 label in groups 1, 2


def test_vote_gated_search_on_a_real_index(searcher, test_images):
    small = searcher.search(test_images, D8, k=10)
    labels = np.array([[m["label"] for m in r.metadata] for r in small])
    shares = (labels == labels[:, :1]).mean(axis=1)
    assert shares.min() < shares.max()  # some queries agree more than others: the gate has a choice
    threshold = float(shares.max())
    expected = shares < threshold - 1e-9
    adaptive = searcher.search(test_images, k=5, cascade=Adaptive(D8, D, gate="vote", vote=threshold))
    np.testing.assert_array_equal([r.escalated for r in adaptive], expected)
    plain = searcher.search(test_images, D, k=5)
    for r, s, p, e in zip(adaptive, small, plain, expected):
        np.testing.assert_array_equal(r.ids, (p if e else s).ids[:5])
        assert r.submodels == (["D/8", "D"] if e else ["D/8"])
    funnel = searcher.search(test_images, k=5, cascade=Funnel(D8, D, 50, "vote", vote=threshold))
    np.testing.assert_array_equal([r.escalated for r in funnel], expected)
    assert np.mean([r.mflops for r in funnel]) == pytest.approx(searcher.mflops(D8)
                                                               + expected.mean() * searcher.mflops(D))
    np.testing.assert_array_equal(knn.labels_of(searcher.store, np.array([[0, -1]])), [[searcher.store.labels[0], -1]])


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
    # padding (-1) and unlabelled results (-1) are relevant to no query
    np.testing.assert_array_equal(knn.labels_of(np.array([7, 8, -1]), np.array([[2, -1, 1]])), [[-1, -1, 8]])
    assert metrics.top1_accuracy(np.array([[-1, 3]]), np.array([-1])) == 0.0
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


def test_search_cli_gates(index_dir, model_dir, test_images, tmp_path, capsys):
    image = tmp_path / "q.png"
    _pil(test_images[:1])[0].save(image)
    base = ["search", "--index", str(index_dir), str(image), "--k", "3", "--json"]
    for flags, mode in ((["--funnel", "D/8:D:50", "--rerank-vote", "0.6"], "funnel D/8->D @50 if vote@10<0.6"),
                        (["--funnel", "8:1:50", "--rerank-vote", "1", "--vote-k", "5"], "funnel D/8->D @50 if vote@5<1"),
                        (["--funnel", "D/8:D:50", "--rerank-margin", "0.02"], "funnel D/8->D @50 if margin<0.02"),
                        (["--adaptive", "D/8:D:vote0.7"], "adaptive D/8->D if vote@10<0.7"),
                        (["--adaptive", "D/8:D:vote0.7", "--vote-k", "20"], "adaptive D/8->D if vote@20<0.7"),
                        (["--adaptive", "D/8:D:0.02"], "adaptive D/8->D if margin<0.02"),
                        (["--adaptive", "D/8:D:margin0.02"], "adaptive D/8->D if margin<0.02")):
        assert main(base + flags) == 0, capsys.readouterr().err
        doc = json.loads(capsys.readouterr().out)
        assert doc["mode"] == mode and len(doc["results"][0]["ids"]) == 3

    for flags, words in ((["--rerank-vote", "0.6"], "--rerank-vote goes with --funnel"),
                         (["--adaptive", "D/8:D:0.02", "--rerank-vote", "0.6"], "put the gate in its spec"),
                         (["--funnel", "D/8:D:50", "--rerank-vote", "1.5"], "in (0, 1]"),
                         (["--funnel", "D/8:D:50", "--vote-k", "5"], "--vote-k goes with a vote gate"),
                         (["--adaptive", "D/8:D:0.02", "--vote-k", "5"], "--vote-k goes with a vote gate"),
                         (["--adaptive", "D/8:D:vote0.6", "--vote-k", "1"], "vote_k"),
                         (["--adaptive", "D/8:D:ballot0.6"], "voteT (label vote)")):
        assert main(base + flags) == 1, flags
        err = capsys.readouterr().err
        assert words in err and err.startswith("matsearch search: error:"), (flags, err)
    with pytest.raises(SystemExit):  # one gate at a time: argparse refuses
        main(base + ["--funnel", "D/8:D:50", "--rerank-vote", "0.6", "--rerank-margin", "0.1"])
    capsys.readouterr()

    folder = tmp_path / "unlabelled"  # an index of a plain folder has no labels: the vote cannot work there
    folder.mkdir()
    for i, img in enumerate(_pil(test_images[:12])):
        img.save(folder / f"{i:02d}.png")
    build_index(str(folder), tmp_path / "unlabelled-index", model_dir=model_dir, device="cpu", progress=False)
    plain = ["search", "--index", str(tmp_path / "unlabelled-index"), str(image), "--json"]
    assert main(plain + ["--adaptive", "D/8:D:vote0.6"]) == 1
    err = capsys.readouterr().err
    assert "needs database labels" in err and "--adaptive SMALL:LARGE:X" in err
    assert main(plain + ["--funnel", "D/8:D:5", "--rerank-vote", "0.6"]) == 1
    assert "needs database labels" in capsys.readouterr().err
    assert main(plain + ["--funnel", "D/8:D:5", "--rerank-margin", "0.05"]) == 0


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
    assert kinds.count("mix'n'match") >= 6 and kinds[-1] == "control"
    # both gates at every default target rate (0.05, 0.25, 0.5); settings calibrating alike are measured once
    gated = {(r["kind"], r["gate"]): [] for r in records if r["gate"] is not None}
    for r in records:
        if r["gate"] is not None:
            gated[(r["kind"], r["gate"])].append(r)
    assert set(gated) == {("funnel", "margin"), ("adaptive", "margin"), ("funnel", "vote"), ("adaptive", "vote")}
    assert [r["target_escalation_rate"] for r in gated[("funnel", "margin")]] == [0.05, 0.25, 0.5]
    for (kind, gate), rs in gated.items():
        assert len({r["setting"] for r in rs}) == len(rs) and 1 <= len(rs) <= 3
        for r in rs:
            assert r["target_escalation_rate"] in (0.05, 0.25, 0.5)
            label = f"vote@10<{r['gate_threshold']:.3g}" if gate == "vote" else f"margin<{r['gate_threshold']:.3g}"
            assert r["setting"].startswith(kind) and r["setting"].endswith(f" if {label}")
            assert (r["vote_k"] == 10 and 0 < r["gate_threshold"] <= 1) if gate == "vote" else r["vote_k"] is None
            assert r["query_mflops"] == pytest.approx(records[3]["query_mflops"]
                                                      + r["escalation_rate"] * records[0]["query_mflops"])
    assert [r["target_escalation_rate"] for r in gated[("funnel", "vote")]] == \
        [r["target_escalation_rate"] for r in gated[("adaptive", "vote")]]
    assert all(r["gate"] is None and r["gate_threshold"] is None for r in records if r["kind"] in ("level", "control"))
    full = records[0]
    assert full["recall@10"] == 1.0 and full["query_mflops"] == pytest.approx(Searcher(index_dir).mflops("D"))
    for r in records:
        assert 0 <= r["top1"] <= 1 and 0 <= r["map@100"] <= 1 and r["latency_ms"] > 0
    funnel_always = next(r for r in records if r["kind"] == "funnel")
    assert funnel_always["escalation_rate"] == 1.0
    assert funnel_always["query_mflops"] == pytest.approx(records[0]["query_mflops"] + records[3]["query_mflops"])
    markdown = (out / "r.md").read_text()
    assert "| setting |" in markdown and markdown.count("\n| ") >= len(records)
    assert " if vote@10<" in markdown and " if margin<" in markdown and "(target 5%)" in markdown
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_refuses_a_wrong_control_folder_before_encoding_anything(model_dir, tmp_path, capsys):
    rc = main(["eval", "--json", str(tmp_path / "r.json"), "--model", str(model_dir),
               "--control-model", str(tmp_path / "no_model_here")])
    captured = capsys.readouterr()
    assert rc != 0 and "no_model_here" in captured.err and "encoding" not in captured.out
    assert not (tmp_path / "r.json").exists()


def test_eval_with_a_multi_view_database(index_dir, model_dir, tmp_path, capsys):
    """--db-views: an in-memory database of view-averaged embeddings, named in every record and the title; an index
    folder of another view set is refused rather than silently evaluated."""
    args = ["eval", "--model", str(model_dir), "--limit-db", "150", "--limit-queries", "30", "--latency-queries", "1",
            "--escalation-rates", "0.25"]
    rc = main(args + ["--json", str(tmp_path / "v.json"), "--markdown", str(tmp_path / "v.md"), "--db-views", "flip"])
    assert rc == 0, capsys.readouterr().err
    records = json.loads((tmp_path / "v.json").read_text())
    assert {r["database_views"] for r in records} == {"flip"} and records[0]["database"] == 150
    assert "each the average of 2 views (flip)" in (tmp_path / "v.md").read_text()
    assert main(args + ["--json", str(tmp_path / "one.json")]) == 0
    one_view = json.loads((tmp_path / "one.json").read_text())
    assert {r["database_views"] for r in one_view} == {"1"}
    rc = main(args + ["--json", str(tmp_path / "x.json"), "--index", str(index_dir), "--db-views", "shift1"])
    assert rc != 0 and "view set '1', not 'shift1'" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


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
