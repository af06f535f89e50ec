"""`--engine ray` on a real local Ray cluster (CPU only) makes the local engine's index: same vectors, metadata,
skipped files; --add and resume work as with the local engine."""
from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from PIL import Image

from conftest import save_small_model

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[distributed]'")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_small_model(tmp_path_factory.mktemp("model"), seed=0, init_std=0.05)


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for i in range(14):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        size = (40 + 7 * i, 30 + 5 * i)
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"img{i:02d}.jpg")
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def _rows(version_dir):
    db = sqlite3.connect(version_dir / "metadata.sqlite")
    try:
        return db.execute("SELECT id, key, label, label_name, sha256, width, height, source FROM items "
                          "ORDER BY id").fetchall()
    finally:
        db.close()


def _same_index(a, b):
    np.testing.assert_allclose(np.load(a.version_dir / "embeddings.npy"), np.load(b.version_dir / "embeddings.npy"),
                               rtol=0, atol=1e-6)
    assert _rows(a.version_dir) == _rows(b.version_dir)
    ma, mb = a.manifest, b.manifest
    for key in ("count", "index_factory", "weights_sha256", "views", "skipped", "label_names"):
        assert ma[key] == mb[key], key


def test_ray_engine_builds_the_local_engines_index(ray_cluster, photos, model_dir, tmp_path):
    from index import build_index

    kwargs = dict(model_dir=model_dir, device="cpu", progress=False, shard_size=6, batch_size=4)
    local = build_index(str(photos), tmp_path / "local", **kwargs)
    distributed = build_index(str(photos), tmp_path / "ray", engine="ray", **kwargs)
    _same_index(local, distributed)
    assert distributed.manifest["build"]["engine"] == "ray" and local.manifest["build"]["engine"] == "local"
    assert [s["key"] for s in distributed.skipped] == ["b/broken.jpg"]

    # --add: new images only, with the index's model, as the local engine does
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)).save(photos / "a" / "new.jpg")
    local_added = build_index(str(photos), tmp_path / "local", add=True, **kwargs)
    ray_added = build_index(str(photos), tmp_path / "ray", add=True, engine="ray", **kwargs)
    assert ray_added.added == local_added.added == 1
    _same_index(local_added, ray_added)


def test_ray_engine_resumes_and_keeps_finished_pieces(ray_cluster, photos, model_dir, tmp_path):
    from index import build_index

    # pieces at shard ends only (a slow start of the pipeline must not cut a time-based one)
    kwargs = dict(model_dir=model_dir, device="cpu", progress=False, shard_size=5, batch_size=4,
                  checkpoint_seconds=3600)
    calls = []

    def stop_after_two(done, total):
        calls.append(done)
        if done == 2:
            raise KeyboardInterrupt  # as a kill would: the build stops between shards

    with pytest.raises(KeyboardInterrupt):
        build_index(str(photos), tmp_path / "ray", engine="ray", on_shard=stop_after_two, **kwargs)
    pieces = sorted(p.name for p in (tmp_path / "ray" / "shards").glob("*/piece-*.npz"))
    assert pieces == ["piece-000000000-000000005.npz", "piece-000000005-000000010.npz"]
    resumed = build_index(str(photos), tmp_path / "ray", engine="ray", **kwargs)
    assert resumed.manifest["build"]["resumed_shards"] == 2
    _same_index(build_index(str(photos), tmp_path / "local", **kwargs), resumed)
    assert json.loads((resumed.version_dir / "manifest.json").read_text())["count"] == 14
