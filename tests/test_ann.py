"""On-disk IVF-PQ (index/ondisk.py) and the auto choice of index type, with real FAISS on small data."""
from __future__ import annotations

import shutil

import faiss
import numpy as np
import pytest

from index import ondisk
from index.index_types import choose_index

from conftest import save_small_model

FACTORY = "IVF16,PQ8x4"  # small codebooks: quick to train on a few thousand vectors


@pytest.fixture(scope="module")
def single_thread():
    """k-means with OpenMP threads competing with other processes on a 2-core machine crawls; one thread does not."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_small_model(tmp_path_factory.mktemp("model"), seed=0, init_std=0.05)


CLUSTER = np.random.default_rng(0).integers(0, 24, 3000)  # each vector's mixture component


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((24, 32)).astype(np.float32)
    x = centres[CLUSTER] + 0.3 * rng.standard_normal((3000, 32)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _same_cluster(found: np.ndarray, queries: np.ndarray) -> float:
    """Share of results in their query's cluster (8x4-bit codes cannot tell a cluster's members apart)."""
    return float((CLUSTER[found] == CLUSTER[queries]).mean())


def _lists(index):
    ivf = faiss.extract_index_ivf(index)
    out = []
    for i in range(ivf.nlist):
        n = ivf.invlists.list_size(i)
        ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(i), n).copy() if n else np.zeros(0, np.int64)
        codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(i), n * ivf.code_size).copy() if n else b""
        out.append((ids.tolist(), bytes(codes)))
    return out


def test_on_disk_build_equals_one_shot_build_and_survives_a_move(tmp_path, vectors, single_thread):
    (tmp_path / "v1").mkdir()
    index, info = ondisk.build(FACTORY, vectors, tmp_path / "v1" / "index.faiss", tmp_path / "work",
                               shard_rows=700, workers=2)
    assert info["shards"] == 5 and info["storage"] == "ondisk" and index.ntotal == len(vectors)
    assert ondisk.is_ondisk(tmp_path / "v1" / "index.faiss") and not list((tmp_path / "work").iterdir())

    # one-shot: the same training, every vector added at once, lists in RAM
    trained, _ = ondisk.train(FACTORY, vectors[ondisk.sample_rows(len(vectors), len(vectors))], "faiss-cpu")
    one_shot = faiss.clone_index(trained)
    one_shot.add(vectors)
    assert _lists(index) == _lists(one_shot)

    shutil.move(tmp_path / "v1", tmp_path / "moved")  # the index names its lists file relative to itself
    reopened = ondisk.read_index(tmp_path / "moved" / "index.faiss")
    for idx in (reopened, one_shot):
        faiss.extract_index_ivf(idx).nprobe = 4
    np.testing.assert_array_equal(reopened.search(vectors[:50], 5)[1], one_shot.search(vectors[:50], 5)[1])
    assert _same_cluster(reopened.search(vectors[:200], 1)[1][:, 0], np.arange(200)) > 0.95


def test_extending_an_on_disk_index_appends_ids_and_keeps_the_base(tmp_path, vectors, single_thread):
    (tmp_path / "v1").mkdir(), (tmp_path / "v2").mkdir()
    base, _ = ondisk.build(FACTORY, vectors[:2000], tmp_path / "v1" / "index.faiss", tmp_path / "work")
    before = _lists(base)
    extended, info = ondisk.build("", vectors[2000:], tmp_path / "v2" / "index.faiss", tmp_path / "work",
                                  base=base, first_id=2000)
    assert extended.ntotal == len(vectors) and info["kmeans"].startswith("reused")
    assert _lists(ondisk.read_index(tmp_path / "v1" / "index.faiss")) == before  # the old version is untouched
    faiss.extract_index_ivf(extended).nprobe = 4
    found = extended.search(vectors[2000:2200], 1)[1][:, 0]
    assert _same_cluster(found, np.arange(2000, 2200)) > 0.95 and (found >= 2000).any()


def test_torch_kmeans_trains_a_usable_coarse_quantizer(vectors, single_thread):
    index, backend = ondisk.train(FACTORY, vectors, "torch-cpu")
    assert backend == "torch-cpu" and index.is_trained
    index.add(vectors)
    faiss.extract_index_ivf(index).nprobe = 4
    assert _same_cluster(index.search(vectors[:200], 1)[1][:, 0], np.arange(200)) > 0.95


def test_rerank_orders_candidates_by_exact_inner_product(vectors):
    queries = vectors[:3]
    candidates = np.array([[5, 0, 9, -1], [1, 7, 2, 3], [-1, -1, 2, 4]])
    scores, ids = ondisk.rerank(vectors, queries, candidates, 2)
    assert ids[0, 0] == 0 and ids[1, 0] == 1  # each query's own vector wins
    exact = np.einsum("qd,qcd->qc", queries, vectors[np.where(candidates >= 0, candidates, 0)])
    exact[candidates < 0] = -np.inf
    np.testing.assert_allclose(scores, -np.sort(-exact, axis=1)[:, :2], rtol=1e-6)


@pytest.mark.parametrize("n, budget_mb, factory, storage", [
    (1_000, 4096, "Flat", "ram"),
    (100_000, 4096, "HNSW32", "ram"),
    (1_000_000, 2048, "IVF4000,Flat", "ram"),
    (10_000_000, 4096, "IVF12649,PQ128x8", "ram"),
    (10_000_000, 256, "IVF12649,PQ64x8", "ondisk"),
    (100_000_000, 4096, "IVF40000,PQ32x8", "ram"),
    (1_000_000_000, 4096, "IVF126491_HNSW32,PQ64x8", "ondisk"),
])
def test_auto_choice_table_over_sizes_and_budgets(n, budget_mb, factory, storage):
    choice = choose_index("auto", n, 512, budget_mb)
    assert (choice.factory, choice.storage) == (factory, storage)
    assert choice.reason  # says why
    if storage == "ondisk":
        assert "disk" in choice.reason and "resident" in choice.reason


def test_auto_refuses_a_budget_below_the_centroids():
    with pytest.raises(ValueError, match="memory budget"):
        choose_index("auto", 1_000_000_000, 512, 128)


def test_store_opens_and_searches_an_on_disk_index_and_add_extends_it(tmp_path, model_dir, single_thread):
    from index import IndexStore, build_index

    result = build_index("fashion-mnist:test", tmp_path / "idx", model_dir=model_dir, index_type="ondisk",
                         limit=1200, device="cpu", progress=False, shard_size=600, batch_size=300)
    m = result.manifest
    assert m["index_storage"] == "ondisk" and (result.version_dir / "index.ivfdata").is_file()
    store = IndexStore.open(tmp_path / "idx", device="cpu")
    vectors = np.asarray(store.vectors)

    # reference: the same factory trained on the same vectors, every vector added at once, in RAM
    reference, _ = ondisk.train(m["index_factory"], vectors, "faiss-cpu")
    reference.add(vectors)
    faiss.extract_index_ivf(reference).nprobe = m["search_params"]["nprobe"]
    np.testing.assert_array_equal(store.search(vectors[:100], 5, rerank=0)[1], reference.search(vectors[:100], 5)[1])

    # by default the PQ candidates are re-scored exactly against the stored vectors: exact scores, better neighbours
    queries = vectors[:200]
    scores, ids = store.search(queries, 10)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, vectors[ids]), rtol=1e-5, atol=1e-6)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    recall = lambda found: np.mean([len(np.intersect1d(a, b)) for a, b in zip(found, exact)]) / 10  # noqa: E731
    assert recall(ids) > recall(store.search(queries, 10, rerank=0)[1]) + 0.1

    added = build_index("fashion-mnist:train", tmp_path / "idx", limit=300, add=True, device="cpu",
                        progress=False)
    assert added.manifest["index_storage"] == "ondisk" and added.manifest["count"] == 1500
    store2 = IndexStore.open(tmp_path / "idx", device="cpu")
    everything = np.asarray(store2.vectors)
    reference.add(everything[1200:])
    np.testing.assert_array_equal(store2.search(everything[1150:1300], 5, rerank=0)[1],
                                  reference.search(everything[1150:1300], 5)[1])
