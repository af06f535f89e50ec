"""IVF-PQ indexes bigger than RAM: trained on a sample, filled shard by shard in parallel, merged on disk and
searched memory-mapped, as autofaiss serves LAION-5B.

    trained, how = train(factory, sample)                   # k-means on the GPU where there is one (`how` says)
    shards = build_shards(trained, vectors, shard_dir)      # vectors: array or memory map; ids = row numbers
    index = merge_shards(trained, shards, "v1/index.faiss") # lists in v1/index.ivfdata (OnDiskInvertedLists)
    index = read_index("v1/index.faiss")                    # memory-mapped; the folder may be moved

A shard is an ordinary IVF index file holding rows [start, stop) with their row numbers as ids, so merging the
shards in order gives exactly the inverted lists a one-shot `add` of all rows makes. The merged index file
refers to its .ivfdata file by name; `read_index` looks for it beside the index file (IO_FLAG_ONDISK_SAME_DIR).
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from .index_types import MIN_POINTS_PER_CENTROID, TRAIN_SAMPLE_CAP, TRAIN_SEED

log = logging.getLogger(__name__)

IVFDATA_SUFFIX = ".ivfdata"
DEFAULT_SHARD_ROWS = 1_000_000
KMEANS_NITER = 16
READ_FLAGS = faiss.IO_FLAG_ONDISK_SAME_DIR  # the lists map their file themselves (IO_FLAG_MMAP on top crashes 1.15)


def ivfdata_path(index_path: str | os.PathLike) -> Path:
    return Path(index_path).with_suffix(IVFDATA_SUFFIX)


def is_ondisk(index_path: str | os.PathLike) -> bool:
    """Whether the index file has its inverted lists in an .ivfdata file beside it."""
    return ivfdata_path(index_path).is_file()


def read_index(index_path: str | os.PathLike) -> faiss.Index:
    """An index file, with on-disk inverted lists memory-mapped from the .ivfdata file in the same folder."""
    return faiss.read_index(str(index_path), READ_FLAGS if is_ondisk(index_path) else 0)


# -- training ------------------------------------------------------------------------------------------------------
def kmeans_backend(prefer: str = "auto") -> str:
    """Where k-means runs: "faiss-gpu" (a FAISS GPU build sees a GPU), "torch-cuda" (torch sees CUDA), or
    "faiss-cpu". `prefer` forces one of them, or "torch-cpu" (the torch path on the CPU, for tests)."""
    if prefer != "auto":
        return prefer
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return "faiss-gpu"
    try:
        import torch
        if torch.cuda.is_available():
            return "torch-cuda"
    except ImportError:
        pass
    return "faiss-cpu"


def training_rows(n: int, nlist: int) -> int:
    """Sample size for k-means: 64 vectors a centroid (well above FAISS's 39), at most TRAIN_SAMPLE_CAP."""
    return min(n, TRAIN_SAMPLE_CAP, max(64 * nlist, 256 * MIN_POINTS_PER_CENTROID))


def sample_rows(n: int, rows: int) -> np.ndarray:
    """Sorted row numbers of a reproducible sample (sorted, so that a memory map is read front to back)."""
    if rows >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(TRAIN_SEED).choice(n, rows, replace=False))


def torch_kmeans(x: np.ndarray, k: int, niter: int = KMEANS_NITER, device: str = "cuda",
                 seed: int = TRAIN_SEED) -> np.ndarray:
    """Spherical k-means (inner-product assignment, unit-norm centroids) of the rows of x on a torch device.
    An empty cluster is re-seeded with a random point, as FAISS does."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    data = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    n = len(data)
    centroids = data[torch.randperm(n, generator=gen)[:k].to(device)].clone()
    rows_per_chunk = max(1, (1 << 27) // k)  # bounds the (rows x k) score matrix
    for _ in range(niter):
        assign = torch.cat([torch.argmax(data[s:s + rows_per_chunk] @ centroids.T, dim=1)
                            for s in range(0, n, rows_per_chunk)])
        sums = torch.zeros_like(centroids).index_add_(0, assign, data)
        counts = torch.bincount(assign, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            sums[empty] = data[torch.randint(n, (len(empty),), generator=gen).to(device)]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids.cpu().numpy()


def train(factory: str, sample: np.ndarray, backend: str = "auto", niter: int = KMEANS_NITER,
          metric: int = faiss.METRIC_INNER_PRODUCT) -> tuple[faiss.Index, str]:
    """An empty index made by `factory` and trained on `sample`; returns it and where its k-means ran.

    On "torch-*" the coarse centroids come from torch_kmeans and FAISS trains the rest (PQ codebooks on the
    residuals) on the CPU; on "faiss-gpu" FAISS clusters with a GPU index; on "faiss-cpu" it does it all itself.
    """
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    index = faiss.index_factory(sample.shape[1], factory, metric)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = niter
    if hasattr(ivf, "pq"):
        ivf.pq.cp.niter = niter
    backend = kmeans_backend(backend)
    if backend.startswith("torch"):
        centroids = torch_kmeans(sample, ivf.nlist, niter, device="cuda" if backend == "torch-cuda" else "cpu")
        ivf.quantizer.add(centroids)  # a trained quantizer holding nlist centroids: IVF training skips k-means
    elif backend == "faiss-gpu":
        flat = faiss.IndexFlatIP(sample.shape[1]) if metric == faiss.METRIC_INNER_PRODUCT else \
            faiss.IndexFlatL2(sample.shape[1])
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(flat)
    index.train(sample)
    return index, backend


# -- filling -------------------------------------------------------------------------------------------------------
def shard_path(shard_dir: Path, number: int) -> Path:
    return Path(shard_dir) / f"ivf-shard-{number:06d}.faiss"


def _shard_done(path: Path, rows: int) -> bool:
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP).ntotal == rows
    except RuntimeError:
        return False


def build_shards(trained: faiss.Index, vectors, shard_dir: str | os.PathLike, shard_rows: int = DEFAULT_SHARD_ROWS,
                 workers: int | None = None, first_id: int = 0, chunk: int = 65_536) -> list[Path]:
    """Shard files holding the rows of `vectors` (an array or memory map, read a chunk at a time), shard_rows
    each, built by `workers` threads (FAISS releases the GIL). Ids are first_id + row. A shard file already
    there with the right count is kept, so a killed build resumes."""
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    n = len(vectors)
    bounds = [(s, min(s + shard_rows, n)) for s in range(0, n, shard_rows)]
    paths = [shard_path(shard_dir, i) for i in range(len(bounds))]
    workers = max(1, min(workers or os.cpu_count() or 1, len(bounds)))

    def one(number: int) -> None:
        path, (start, stop) = paths[number], bounds[number]
        if _shard_done(path, stop - start):
            return
        shard = faiss.clone_index(trained)
        for s in range(start, stop, chunk):
            e = min(s + chunk, stop)
            shard.add_with_ids(np.ascontiguousarray(vectors[s:e], dtype=np.float32),
                               np.arange(first_id + s, first_id + e, dtype=np.int64))
        tmp = path.with_name(f".{path.name}.tmp")
        faiss.write_index(shard, str(tmp))
        os.replace(tmp, path)  # a killed build never leaves a half-written shard under the final name

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, threads // workers))  # workers x OpenMP threads = the cores, not more
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="ivf-shard") as pool:
            list(pool.map(one, range(len(bounds))))
    finally:
        faiss.omp_set_num_threads(threads)
    return paths


def merge_shards(trained: faiss.Index, shard_paths: Sequence[str | os.PathLike], index_path: str | os.PathLike,
                 base: faiss.Index | None = None) -> faiss.Index:
    """Write index_path (+ .ivfdata beside it): `trained`'s quantizer and codebooks with the inverted lists of
    `base` (an index to extend, e.g. the previous version's) followed by those of each shard, in order.

    This is faiss.contrib.ondisk.merge_ondisk, plus the base's lists, and shards read memory-mapped with their ids
    kept as they are. Returns the merged index, memory-mapped.
    """
    index_path = Path(index_path)
    data_path = ivfdata_path(index_path)
    data_path.unlink(missing_ok=True)
    sources = [] if base is None else [faiss.extract_index_ivf(base).invlists]
    keep = [base]  # the inverted lists are used by pointer: keep their indexes alive until merged
    for path in shard_paths:
        shard = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
        keep.append(shard)
        sources.append(faiss.extract_index_ivf(shard).invlists)
    merged = faiss.clone_index(trained)
    ivf = faiss.extract_index_ivf(merged)
    if ivf.ntotal:
        raise ValueError("merge_shards needs an empty trained index")
    invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(data_path))
    vector = faiss.InvertedListsPtrVector()
    for lists in sources:
        vector.push_back(lists)
    ntotal = invlists.merge_from_multiple(vector.data(), vector.size(), False)
    merged.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    tmp = index_path.with_name(f".{index_path.name}.tmp")
    faiss.write_index(merged, str(tmp))
    os.replace(tmp, index_path)
    del merged, keep
    return read_index(index_path)


def emptied(index: faiss.Index) -> faiss.Index:
    """A copy of a trained IVF index with its quantizer and codebooks but no vectors (lists left untouched)."""
    ivf = faiss.extract_index_ivf(index)
    lists, own, counts = ivf.invlists, ivf.own_invlists, (index.ntotal, ivf.ntotal)
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.own_invlists = False
    ivf.replace_invlists(empty, False)
    index.ntotal = ivf.ntotal = 0
    try:
        return faiss.clone_index(index)
    finally:
        ivf.replace_invlists(lists, own)
        index.ntotal, ivf.ntotal = counts


def build(factory: str, vectors, index_path: str | os.PathLike, work_dir: str | os.PathLike,
          shard_rows: int = DEFAULT_SHARD_ROWS, workers: int | None = None, kmeans: str = "auto",
          base: faiss.Index | None = None, first_id: int = 0) -> tuple[faiss.Index, dict]:
    """Train on a sample of `vectors` (or reuse `base`'s training), fill shards in parallel, merge on disk.

    vectors: (n, d) array or memory map. With `base` (an IVF index of the same factory, e.g. the previous
    version's), the rows get ids first_id + row and follow its lists. Shard files are deleted once merged.
    Returns the memory-mapped index and what happened (for the manifest).
    """
    n = len(vectors)
    if n < 1:
        raise ValueError("an on-disk index needs at least one vector")
    started = time.perf_counter()
    if base is None:
        probe = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        rows = sample_rows(n, training_rows(n, faiss.extract_index_ivf(probe).nlist))
        trained, backend = train(factory, vectors[rows], kmeans)
    else:
        trained, backend = emptied(base), "reused from the base index"
    trained_at = time.perf_counter()
    paths = build_shards(trained, vectors, work_dir, shard_rows, workers, first_id)
    filled_at = time.perf_counter()
    index = merge_shards(trained, paths, index_path, base)
    for path in paths:
        path.unlink(missing_ok=True)
    info = {"storage": "ondisk", "kmeans": backend, "shards": len(paths), "shard_rows": shard_rows,
            "train_seconds": round(trained_at - started, 3), "fill_seconds": round(filled_at - trained_at, 3),
            "merge_seconds": round(time.perf_counter() - filled_at, 3),
            "ivfdata_bytes": ivfdata_path(index_path).stat().st_size}
    return index, info


# -- search --------------------------------------------------------------------------------------------------------
def rerank(vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int,
           block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product re-ranking of each query's candidate ids (-1: none) against `vectors` (e.g. the
    stored embeddings, memory-mapped; only the candidates' rows are read, `block` queries at a time).
    Returns the top k (scores, ids)."""
    out_scores = np.empty((len(queries), k), dtype=np.float32)
    out_ids = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), block):
        cand = candidates[s:s + block]
        n_q, n_c = cand.shape
        safe = np.where(cand >= 0, cand, 0).ravel()
        order = np.argsort(safe, kind="stable")  # read the memory map in row order
        rows = np.empty((n_q * n_c, vectors.shape[1]), dtype=np.float32)
        rows[order] = vectors[safe[order]]
        scores = np.einsum("qcd,qd->qc", rows.reshape(n_q, n_c, -1), queries[s:s + block].astype(np.float32))
        scores[cand < 0] = -np.inf
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out_scores[s:s + n_q] = np.take_along_axis(scores, top, 1)
        out_ids[s:s + n_q] = np.take_along_axis(cand, top, 1)
    return out_scores, out_ids
