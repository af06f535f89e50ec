"""Which FAISS index to build, and how to build and tune it. Every index uses inner product on L2-normalised
vectors (cosine similarity), is made with `faiss.index_factory` and keeps FAISS's sequential ids, so a FAISS id
is the row of the stored embeddings and the id of the metadata row.

Named types: "flat" (exact), "ivf" (IVF{nlist},Flat), "ivfpq" (IVF{nlist},PQ{m}), "hnsw" (HNSW32), any FAISS
factory string (e.g. "OPQ16,IVF1024,PQ16"), or "auto", which picks from the vector count n, the dimension d and
a memory budget, in the spirit of autofaiss:

  1. n <= 50,000 and the raw vectors (4*d bytes each) fit the budget   -> Flat: exact, and fast at that size
  2. n <= 2,000,000 and HNSW32 (vectors + ~280 bytes of graph each) fits -> HNSW32: fastest queries, no training
  3. IVF-Flat (vectors + 8-byte ids + centroids) fits                   -> IVF{nlist},Flat, nlist = 4*sqrt(n)
  4. otherwise                                                           -> IVF{nlist},PQ{m}, m the largest
     divisor of d (at most d/2) whose m-byte codes + 8-byte ids + centroids and codebooks fit the budget

nlist is 4*sqrt(n), capped so that every list gets at least 39 training vectors (FAISS warns below that).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

NAMED_TYPES = ("flat", "ivf", "ivfpq", "hnsw", "auto")
HNSW_M = 32
HNSW_BYTES_PER_VECTOR = HNSW_M * 2 * 4 + 24  # level-0 links (2M int32) + upper levels and bookkeeping, roughly
AUTO_FLAT_MAX = 50_000
AUTO_HNSW_MAX = 2_000_000
MIN_POINTS_PER_CENTROID = 39  # FAISS's own threshold for a well-trained k-means
TRAIN_SAMPLE_CAP = 1_000_000
TRAIN_SEED = 1234
DEFAULT_EF_SEARCH = 128
SEARCH_PARAMS = ("nprobe", "efSearch")


@dataclass(frozen=True)
class IndexChoice:
    index_type: str  # what was asked for: a named type or "factory"
    factory: str  # the faiss.index_factory string
    reason: str  # why, in words (for "auto" above all)


def ivf_nlist(n: int) -> int:
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID))


def _pq_nbits(n: int) -> int:
    """Bits per PQ code: 8 (256 centroids per sub-quantizer) once there are 39 training points per centroid;
    smaller sets get smaller codebooks rather than badly trained ones."""
    return max(1, min(8, int(math.log2(max(n // MIN_POINTS_PER_CENTROID, 2)))))


def _divisors(d: int) -> list[int]:
    return [m for m in range(1, d + 1) if d % m == 0]


def choose_index(index_type: str, n: int, d: int, memory_budget_mb: float = 4096) -> IndexChoice:
    """The factory string for `index_type` given n vectors of dimension d (see the module docstring)."""
    kind = index_type.lower()
    nlist = ivf_nlist(n)
    if kind == "flat":
        return IndexChoice("flat", "Flat", "exact search")
    if kind == "hnsw":
        return IndexChoice("hnsw", f"HNSW{HNSW_M}", "graph search, no training")
    if kind == "ivf":
        return IndexChoice("ivf", f"IVF{nlist},Flat", f"nlist = 4*sqrt(n) capped at n/{MIN_POINTS_PER_CENTROID}")
    if kind == "ivfpq":
        m = max(m for m in _divisors(d) if m <= max(1, d // 4))  # ~4 dimensions per sub-quantizer
        nbits = _pq_nbits(n)
        return IndexChoice("ivfpq", f"IVF{nlist},PQ{m}x{nbits}", f"PQ codes of {m} x {nbits} bits")
    if kind != "auto":
        try:  # a raw factory string: let FAISS say whether it understands it
            faiss.index_factory(d, index_type, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"--index-type {index_type!r} is neither one of {NAMED_TYPES} nor a FAISS "
                             f"factory string FAISS accepts: {str(e).strip().splitlines()[-1]}") from None
        return IndexChoice("factory", index_type, "FAISS factory string given by the user")

    budget = memory_budget_mb * 2 ** 20
    flat_bytes = n * d * 4
    if n <= AUTO_FLAT_MAX and flat_bytes <= budget:
        return IndexChoice("auto", "Flat", f"{n} vectors <= {AUTO_FLAT_MAX} fit the budget: exact search")
    if n <= AUTO_HNSW_MAX and n * (d * 4 + HNSW_BYTES_PER_VECTOR) <= budget:
        return IndexChoice("auto", f"HNSW{HNSW_M}", f"{n} vectors <= {AUTO_HNSW_MAX}, HNSW graph fits the budget")
    centroid_bytes = nlist * d * 4
    if flat_bytes + n * 8 + centroid_bytes <= budget:
        return IndexChoice("auto", f"IVF{nlist},Flat", f"{n} vectors: raw vectors in IVF lists fit the budget")
    nbits = _pq_nbits(n)
    fixed = centroid_bytes + (2 ** nbits) * d * 4  # coarse centroids + PQ codebooks
    fitting = [m for m in _divisors(d) if m <= max(1, d // 2) and n * (m * nbits / 8 + 8) + fixed <= budget]
    if not fitting:
        need = (n * (nbits / 8 + 8) + fixed) / 2 ** 20
        raise ValueError(f"memory budget {memory_budget_mb} MB cannot hold {n} vectors even as 1-byte PQ codes "
                         f"(needs about {need:.0f} MB): raise --memory-budget-mb")
    m = max(fitting)
    return IndexChoice("auto", f"IVF{nlist},PQ{m}x{nbits}",
                       f"{n} vectors of dim {d} exceed the {memory_budget_mb} MB budget uncompressed: "
                       f"PQ codes of {m} x {nbits} bits")


def train_and_fill(factory: str, vectors: np.ndarray, chunk: int = 65_536) -> faiss.Index:
    """A new index from `factory`, trained on a sample of `vectors` if it needs it, holding all of them."""
    d = vectors.shape[1]
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(training_sample(vectors))
    add_vectors(index, vectors, chunk)
    return index


def training_sample(vectors: np.ndarray) -> np.ndarray:
    """At most TRAIN_SAMPLE_CAP rows, drawn with a fixed seed so that rebuilds are reproducible."""
    n = len(vectors)
    if n <= TRAIN_SAMPLE_CAP:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.sort(np.random.default_rng(TRAIN_SEED).choice(n, TRAIN_SAMPLE_CAP, replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def add_vectors(index: faiss.Index, vectors: np.ndarray, chunk: int = 65_536) -> None:
    """Add in chunks, so that memory-mapped vectors are never read into memory all at once."""
    for start in range(0, len(vectors), chunk):
        index.add(np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32))


def default_search_params(index: faiss.Index) -> dict:
    """Recall-leaning defaults: nprobe = nlist/32 (at least 16, at most nlist); efSearch = 128."""
    params = {}
    try:
        nlist = faiss.extract_index_ivf(index).nlist
        params["nprobe"] = min(nlist, max(16, nlist // 32))
        params["nlist"] = nlist
    except RuntimeError:
        pass  # not an IVF index
    if hasattr(faiss.downcast_index(index), "hnsw"):
        params["efSearch"] = DEFAULT_EF_SEARCH
    return params


def apply_search_params(index: faiss.Index, params: dict, gpu: bool = False) -> None:
    """Set e.g. {"nprobe": 32, "efSearch": 128}; a parameter the index type has no use for is ignored."""
    space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
    for name, value in params.items():
        if value is None or name not in SEARCH_PARAMS:
            continue
        try:
            space.set_index_parameter(index, name, float(value))
        except RuntimeError:
            pass  # e.g. nprobe on a flat index
