"""Which FAISS index to build, and how to build and tune it. Every index uses inner product on L2-normalised
vectors (cosine similarity), is made with `faiss.index_factory` and keeps FAISS's sequential ids, so a FAISS id
is the row of the stored embeddings and the id of the metadata row.

Named types: "flat" (exact), "ivf" (IVF{nlist},Flat), "ivfpq" (IVF{nlist},PQ{m}), "hnsw" (HNSW32), "ondisk"
(IVF-PQ whose inverted lists live in a memory-mapped file beside the index, see ondisk.py), any FAISS factory
string (e.g. "OPQ16,IVF1024,PQ16"), or "auto", which picks from the vector count n, the dimension d and a memory
budget (the RAM the index may hold resident), in the spirit of autofaiss:

  1. n <= 50,000 and the raw vectors (4*d bytes each) fit the budget   -> Flat: exact, and fast at that size
  2. n <= 2,000,000 and HNSW32 (vectors + ~280 bytes of graph each) fits -> HNSW32: fastest queries, no training
  3. IVF-Flat (vectors + 8-byte ids + centroids) fits                   -> IVF{nlist},Flat, nlist = 4*sqrt(n)
  4. IVF-PQ in RAM with m >= d/16 bytes a vector fits                     -> IVF{nlist},PQ{m}, m the largest divisor
     of d (at most d/4) whose m-byte codes + 8-byte ids + centroids and codebooks fit the budget
  5. otherwise, if the centroids, codebooks and list directory fit      -> IVF-PQ on disk, m = d/8: the codes and ids
     are paged in from a memory-mapped file, so their size is bounded by the disk, not by RAM

nlist is 4*sqrt(n), capped so that every list gets at least 39 training vectors (FAISS warns below that). From
ONDISK_HNSW_NLIST lists on, the on-disk tier's coarse quantizer is an HNSW graph over the centroids (as autofaiss
does), since assigning 10^8-10^9 vectors to 10^5 centroids by brute force would dominate the build.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

NAMED_TYPES = ("flat", "ivf", "ivfpq", "hnsw", "ondisk", "auto")
HNSW_M = 32
HNSW_BYTES_PER_VECTOR = HNSW_M * 2 * 4 + 24  # level-0 links (2M int32) + upper levels and bookkeeping, roughly
AUTO_FLAT_MAX = 50_000
AUTO_HNSW_MAX = 2_000_000
MIN_POINTS_PER_CENTROID = 39  # FAISS's own threshold for a well-trained k-means
TRAIN_SAMPLE_CAP = 1_000_000
TRAIN_SEED = 1234
DEFAULT_EF_SEARCH = 128
SEARCH_PARAMS = ("nprobe", "efSearch")
ONDISK_HNSW_NLIST = 16_384
ONDISK_LIST_BYTES = 64  # per inverted list kept in RAM by OnDiskInvertedLists (offset, size, capacity) and the IVF
RAM, ONDISK = "ram", "ondisk"


@dataclass(frozen=True)
class IndexChoice:
    index_type: str  # what was asked for: a named type or "factory"
    factory: str  # the faiss.index_factory string
    reason: str  # why, in words (for "auto" above all)
    storage: str = RAM  # "ram": one index file read into memory; "ondisk": inverted lists memory-mapped (ondisk.py)


def ivf_nlist(n: int) -> int:
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID))


def _pq_nbits(n: int) -> int:
    """Bits per PQ code: 8 (256 centroids per sub-quantizer) once there are 39 training points per centroid;
    smaller sets get smaller codebooks rather than badly trained ones."""
    return max(1, min(8, int(math.log2(max(n // MIN_POINTS_PER_CENTROID, 2)))))


def _divisors(d: int) -> list[int]:
    return [m for m in range(1, d + 1) if d % m == 0]


def _pq_fixed_bytes(nlist: int, d: int, nbits: int) -> int:
    """What an IVF-PQ index holds whatever n is: coarse centroids and the PQ codebooks."""
    return nlist * d * 4 + (2 ** nbits) * d * 4


def ondisk_factory(n: int, d: int) -> tuple[str, int]:
    """The on-disk tier's factory string and its code size m (bytes a vector, d/8 rounded to a divisor of d)."""
    nlist = ivf_nlist(n)
    m = max(m for m in _divisors(d) if m <= max(1, d // 8))
    quantizer = f"IVF{nlist}_HNSW{HNSW_M}" if nlist >= ONDISK_HNSW_NLIST else f"IVF{nlist}"
    return f"{quantizer},PQ{m}x{_pq_nbits(n)}", m


def ondisk_resident_bytes(n: int, d: int) -> int:
    """RAM an on-disk IVF-PQ index keeps resident: centroids (+ their HNSW graph), codebooks, list directory."""
    nlist = ivf_nlist(n)
    graph = nlist * HNSW_BYTES_PER_VECTOR if nlist >= ONDISK_HNSW_NLIST else 0
    return _pq_fixed_bytes(nlist, d, _pq_nbits(n)) + graph + nlist * ONDISK_LIST_BYTES


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
    if kind == "ondisk":
        factory, m = ondisk_factory(n, d)
        return IndexChoice("ondisk", factory, f"PQ codes of {m} bytes in memory-mapped inverted lists", ONDISK)
    if kind != "auto":
        try:  # a raw factory string: let FAISS say whether it understands it
            faiss.index_factory(d, index_type, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"--index-type {index_type!r} is neither one of {NAMED_TYPES} nor a FAISS "
                             f"factory string FAISS accepts: {str(e).strip().splitlines()[-1]}") from None
        return IndexChoice("factory", index_type, "FAISS factory string given by the user")

    budget = memory_budget_mb * 2 ** 20
    mb = f"{memory_budget_mb:g} MB"
    flat_bytes = n * d * 4
    if n <= AUTO_FLAT_MAX and flat_bytes <= budget:
        return IndexChoice("auto", "Flat", f"{n} vectors <= {AUTO_FLAT_MAX} fit the budget: exact search")
    if n <= AUTO_HNSW_MAX and n * (d * 4 + HNSW_BYTES_PER_VECTOR) <= budget:
        return IndexChoice("auto", f"HNSW{HNSW_M}", f"{n} vectors <= {AUTO_HNSW_MAX}, HNSW graph fits the budget")
    centroid_bytes = nlist * d * 4
    if flat_bytes + n * 8 + centroid_bytes <= budget:
        return IndexChoice("auto", f"IVF{nlist},Flat", f"{n} vectors: raw vectors in IVF lists fit the budget")
    nbits = _pq_nbits(n)
    fixed = _pq_fixed_bytes(nlist, d, nbits)
    fitting = [m for m in _divisors(d) if max(1, d // 16) <= m <= max(1, d // 4)
               and n * (m * nbits / 8 + 8) + fixed <= budget]
    if fitting:
        m = max(fitting)
        return IndexChoice("auto", f"IVF{nlist},PQ{m}x{nbits}",
                           f"{n} vectors of dim {d} exceed the {mb} budget uncompressed: PQ codes of {m} x "
                           f"{nbits} bits in RAM ({n * (m * nbits / 8 + 8) / 2 ** 20:.0f} MB of lists)")
    resident = ondisk_resident_bytes(n, d)
    factory, m = ondisk_factory(n, d)
    if resident > budget:
        raise ValueError(f"memory budget {memory_budget_mb} MB cannot hold the centroids and codebooks of an "
                         f"on-disk IVF-PQ index of {n} vectors (needs about {resident / 2 ** 20:.0f} MB resident): "
                         "raise --memory-budget-mb")
    on_disk = n * (m + 8) / 2 ** 30
    return IndexChoice("auto", factory,
                       f"{n} vectors of dim {d}: even {max(1, d // 16)}-byte PQ codes exceed the {mb} budget in "
                       f"RAM; {m}-byte codes in memory-mapped inverted lists on disk ({on_disk:.1f} GiB), "
                       f"{resident / 2 ** 20:.0f} MB resident", ONDISK)


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


def write_new_index(choice: IndexChoice, vectors: np.ndarray, index_path, work_dir) -> tuple[faiss.Index, str]:
    """Build `choice` over all `vectors` and write it to index_path; returns the index and its storage.
    An on-disk choice is built by ondisk.build (sample-trained, shards in `work_dir`, lists in a .ivfdata file)."""
    if choice.storage == ONDISK:
        from . import ondisk

        index, _ = ondisk.build(choice.factory, vectors, index_path, work_dir)
        return index, ONDISK
    index = train_and_fill(choice.factory, vectors)
    faiss.write_index(index, str(index_path))
    return index, RAM


def extend_index(base_path, vectors: np.ndarray, n_base: int, index_path, work_dir) -> tuple[faiss.Index, str]:
    """The index at base_path plus vectors[n_base:] (ids n_base...), written to index_path; the base is untouched.
    An on-disk base keeps its training and gets the new rows' lists merged after its own."""
    from . import ondisk

    base = ondisk.read_index(base_path)
    if ondisk.is_ondisk(base_path):
        index, _ = ondisk.build("", vectors[n_base:], index_path, work_dir, base=base, first_id=n_base)
        return index, ONDISK
    add_vectors(base, vectors[n_base:])
    faiss.write_index(base, str(index_path))
    return base, RAM
