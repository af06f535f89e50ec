"""How far one small machine goes with an on-disk IVF-PQ index: build time, size on disk, RAM while searching,
queries/s and recall@10 against exact search, on a synthetic collection bigger than RAM would like.

    python -m benchmarks.ann_scale --n 10000000 --work data/ann_scale --out results/ann

The collection: n unit vectors of dimension --dim drawn from a mixture of Gaussians with realistic structure:
Zipf-weighted cluster centres on the sphere, within-cluster spread in a shared low-dimensional subspace with a
decaying spectrum (embeddings of images have a low intrinsic dimension), plus a little isotropic noise; then
L2-normalised. Every chunk of --chunk rows is drawn from its own seed, so the collection is made a chunk at a time
and never held in RAM. Queries are drawn from the same mixture with other seeds (they are not in the collection).

Phases (each resumes from its files in --work):
  1. generate: the vectors, stored as float16 (half the raw size; used to fill the index and to re-rank), and a
               digest of every chunk
  2. build:    index.ondisk.build: IVF-PQ trained on a sample, shards filled in parallel, merged on disk
  3. truth:    the exact top-k of every query, by chunked brute force over the float32 vectors drawn again, and
               the same digests, which must match phase 1's; `--groundtruth-only --gt-device cuda --gen-workers 16`
               runs this phase alone on a GPU machine (copy its folder's files into --work here afterwards)
  4. search:   a fresh process opens the index memory-mapped and sweeps nprobe and re-ranking depth; it reports
               queries/s over all queries and its RSS (anonymous and file-backed) while searching
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import time
from pathlib import Path

import numpy as np

GT_FILE, VECTORS_FILE, QUERIES_FILE, INDEX_FILE = "groundtruth.npy", "vectors.f16.npy", "queries.npy", "index.faiss"


class Mixture:
    """The synthetic collection: chunk(i) is rows [i*chunk, (i+1)*chunk), the same every time."""

    def __init__(self, dim: int, clusters: int, latent: int, seed: int, spread: float = 0.55, noise: float = 0.2):
        rng = np.random.default_rng([seed, 0])
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        basis, _ = np.linalg.qr(rng.standard_normal((dim, latent)))  # orthonormal columns
        spectrum = (1.0 / np.sqrt(1.0 + np.arange(latent))).astype(np.float32)
        # rows of the within-cluster map, scaled so that the expected squared spread is spread**2
        self.within = (spectrum[:, None] * basis.T).astype(np.float32) * spread / np.sqrt((spectrum ** 2).sum())
        weights = 1.0 / (np.arange(clusters) + 10.0) ** 0.7  # Zipf-like cluster sizes
        self.weights = weights / weights.sum()
        self.dim, self.latent, self.seed, self.noise = dim, latent, seed, noise / np.sqrt(dim)

    def draw(self, rows: int, stream: int, part: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, part])
        comp = rng.choice(len(self.centres), rows, p=self.weights)
        x = self.centres[comp] + rng.standard_normal((rows, self.latent), dtype=np.float32) @ self.within
        x += self.noise * rng.standard_normal((rows, self.dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def rss() -> dict:
    """This process's resident memory now (anonymous and file-backed, MB) and its peak."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    mb = lambda key: round(int(status.get(key, "0 kB").split()[0]) / 1024, 1)  # noqa: E731
    return {"rss_mb": mb("VmRSS"), "rss_anon_mb": mb("RssAnon"), "rss_file_mb": mb("RssFile"),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _draw_chunk(job):
    mix, start, stop, part = job
    return start, mix.draw(stop - start, stream=0, part=part)


def chunks(args, mix: Mixture, workers: int):
    """(start, float32 rows) for every chunk of the collection, in order; drawn by `workers` processes."""
    jobs = [(mix, start, min(start + args.chunk, args.n), part)
            for part, start in enumerate(range(0, args.n, args.chunk))]
    if workers <= 1:
        yield from map(_draw_chunk, jobs)
        return
    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_draw_chunk, jobs)


def digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16]


def groundtruth(args, work: Path, mix: Mixture) -> dict:
    """Exact top-k of every query by chunked brute force (float32; on --gt-device), and a digest of every chunk so
    that a collection generated elsewhere can be checked to be this one. Resumes from its files."""
    import torch

    if (work / GT_FILE).is_file():
        return json.loads((work / "groundtruth.json").read_text())
    started = time.perf_counter()
    device = torch.device(args.gt_device)
    torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 scores
    queries = mix.draw(args.queries, stream=1, part=0)
    q = torch.from_numpy(queries).to(device)
    best_scores = torch.full((len(q), args.k), -np.inf, device=device)
    best_ids = torch.full((len(q), args.k), -1, dtype=torch.int64, device=device)
    digests = []
    for start, x in chunks(args, mix, args.gen_workers):
        digests.append(digest(x))
        scores = q @ torch.from_numpy(x).to(device).T
        top = torch.topk(scores, min(args.k, len(x)), dim=1)
        merged_scores = torch.cat([best_scores, top.values], 1)
        merged_ids = torch.cat([best_ids, top.indices + start], 1)
        keep = torch.topk(merged_scores, args.k, dim=1).indices
        best_scores, best_ids = merged_scores.gather(1, keep), merged_ids.gather(1, keep)
        if len(digests) % 10 == 1:
            print(f"groundtruth: {start + len(x)}/{args.n} rows, {time.perf_counter() - started:.0f} s", flush=True)
    np.save(work / QUERIES_FILE, queries)
    info = {"groundtruth_seconds": round(time.perf_counter() - started, 1), "groundtruth_device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
            "queries_digest": digest(queries), "chunk_digests": digests}
    (work / "groundtruth.json").write_text(json.dumps(info))
    np.save(work / GT_FILE, best_ids.cpu().numpy())
    return info


def generate(args, work: Path, mix: Mixture) -> dict:
    """The collection as float16 (for filling the index and re-ranking), with a digest of every chunk."""
    if (work / VECTORS_FILE).is_file():
        return json.loads((work / "generate.json").read_text())
    started = time.perf_counter()
    digests = []
    vectors = np.lib.format.open_memmap(work / f".{VECTORS_FILE}", mode="w+", dtype=np.float16,
                                        shape=(args.n, args.dim))
    for part, (start, x) in enumerate(chunks(args, mix, args.gen_workers)):
        digests.append(digest(x))
        vectors[start:start + len(x)] = x
        if part % 10 == 0:
            print(f"generate: {start + len(x)}/{args.n} rows, {time.perf_counter() - started:.0f} s", flush=True)
    vectors.flush()
    del vectors
    os.replace(work / f".{VECTORS_FILE}", work / VECTORS_FILE)
    info = {"generate_seconds": round(time.perf_counter() - started, 1),
            "vectors_f16_bytes": (work / VECTORS_FILE).stat().st_size,
            "queries_digest": digest(mix.draw(args.queries, stream=1, part=0)), "chunk_digests": digests}
    (work / "generate.json").write_text(json.dumps(info))
    return info


def build(args, work: Path) -> dict:
    from index import ondisk

    if (work / INDEX_FILE).is_file():
        return json.loads((work / "build.json").read_text())
    import faiss

    faiss.omp_set_num_threads(args.build_threads)
    vectors = np.load(work / VECTORS_FILE, mmap_mode="r")
    started = time.perf_counter()
    _, info = ondisk.build(args.factory, vectors, work / INDEX_FILE, work / "shards", shard_rows=args.shard_rows,
                           workers=args.build_workers, kmeans=args.kmeans)
    info["build_seconds"] = round(time.perf_counter() - started, 1)
    info["index_bytes"] = (work / INDEX_FILE).stat().st_size + info["ivfdata_bytes"]
    (work / "build.json").write_text(json.dumps(info))
    return info


def _search_child(args_dict: dict, work: str, conn) -> None:
    """In a fresh process, so that RSS counts what searching needs and nothing the build left behind."""
    import faiss

    from index import ondisk

    args = argparse.Namespace(**args_dict)
    work = Path(work)
    faiss.omp_set_num_threads(args.threads)
    queries, gt = np.load(work / QUERIES_FILE), np.load(work / GT_FILE)
    opened = time.perf_counter()
    index = ondisk.read_index(work / INDEX_FILE)
    vectors = np.load(work / VECTORS_FILE, mmap_mode="r")  # re-ranking reads only the candidates' rows
    rows = [{"stage": "opened", "open_seconds": round(time.perf_counter() - opened, 3), **rss()}]
    ivf = faiss.extract_index_ivf(index)
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        for depth in args.rerank:
            fetch = max(args.k, depth)
            index.search(queries[:200], fetch)  # warm-up: page in the lists' first touches
            started = time.perf_counter()
            scores, ids = index.search(queries, fetch)
            if depth:
                scores, ids = ondisk.rerank(vectors, queries, ids, args.k)
            seconds = time.perf_counter() - started
            ids = ids[:, :args.k]
            recall = float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(ids, gt)]) / args.k)
            row = {"nprobe": nprobe, "rerank": depth, "recall_at_10": round(recall, 4),
                   "queries_per_second": round(len(queries) / seconds, 1), "seconds": round(seconds, 2), **rss()}
            print(f"search: nprobe {nprobe:4d} rerank {depth:4d}: recall@{args.k} {recall:.4f}, "
                  f"{row['queries_per_second']:8.1f} q/s, RSS {row['rss_mb']} MB", flush=True)
            rows.append(row)
    conn.send(rows)


def search(args, work: Path) -> list[dict]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_search_child, args=(vars(args), str(work), child))
    proc.start()
    rows = parent.recv()
    proc.join()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=10_000_000, help="collection size (default 10^7)")
    p.add_argument("--dim", type=int, default=512, help="dimension (default 512: the 35M model's width)")
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--clusters", type=int, default=2000, help="mixture components")
    p.add_argument("--latent", type=int, default=64, help="dimension of the within-cluster subspace")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=100_000, help="rows generated at a time")
    p.add_argument("--nlist", type=int, default=4096)
    p.add_argument("--m", type=int, default=64, help="PQ bytes a vector")
    p.add_argument("--factory", help="FAISS factory string (default IVF{nlist},PQ{m})")
    p.add_argument("--kmeans", default="auto", help="auto | faiss-gpu | torch-cuda | faiss-cpu | torch-cpu")
    p.add_argument("--shard-rows", type=int, default=1_000_000)
    p.add_argument("--build-workers", type=int, default=2)
    p.add_argument("--nprobe", type=lambda s: [int(v) for v in s.split(",")], default=[8, 16, 32, 64])
    p.add_argument("--rerank", type=lambda s: [int(v) for v in s.split(",")], default=[0, 50, 100],
                   help="re-ranking depths against the stored float16 vectors (0: PQ scores only)")
    p.add_argument("--threads", type=int, default=2, help="search threads")
    p.add_argument("--build-threads", type=int, default=os.cpu_count(),
                   help="FAISS threads for training and filling (on a machine shared with other work, 1 avoids "
                        "OpenMP threads waiting on each other)")
    p.add_argument("--work", default="data/ann_scale", help="working folder (vectors, index)")
    p.add_argument("--out", default="results/ann", help="folder for the json and md results")
    p.add_argument("--gt-device", default="cpu", help="where the exact ground truth is computed (cpu | cuda)")
    p.add_argument("--gen-workers", type=int, default=1, help="processes drawing the collection's chunks")
    p.add_argument("--groundtruth-only", action="store_true",
                   help="stop after the ground truth (run it on a faster machine, then copy the files into --work)")
    p.add_argument("--build-only", action="store_true", help="stop after the build (phases 1-2)")
    p.add_argument("--keep", action="store_true", help="keep the working folder afterwards")
    args = p.parse_args(argv)
    args.factory = args.factory or f"IVF{args.nlist},PQ{args.m}"

    from index.index_types import choose_index

    work = Path(args.work) / f"n{args.n}-d{args.dim}-s{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    mix = Mixture(args.dim, args.clusters, args.latent, args.seed)
    if args.groundtruth_only:  # e.g. on a GPU machine: copy the folder's files into --work here, then run the rest
        groundtruth(args, work, mix)
        print(f"ground truth in {work}: {GT_FILE}, {QUERIES_FILE}, groundtruth.json")
        return 0
    gen = generate(args, work, mix)
    built = build(args, work)
    if args.build_only:
        print(f"built {work / INDEX_FILE}")
        return 0
    truth = groundtruth(args, work, mix)
    if (truth["queries_digest"], truth["chunk_digests"]) != (gen["queries_digest"], gen["chunk_digests"]):
        raise SystemExit("the ground truth was computed on another collection (seed, size, chunk or NumPy differ)")
    rows = search(args, work)
    raw_gb = args.n * args.dim * 4 / 1e9
    auto = {f"{b} MB": (lambda c: {"factory": c.factory, "storage": c.storage, "reason": c.reason})(
        choose_index("auto", args.n, args.dim, b)) for b in (256, 1024, 4096)}
    result = {
        "n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k, "factory": args.factory,
        "raw_float32_gb": round(raw_gb, 2), "clusters": args.clusters, "latent": args.latent,
        "groundtruth": {k: v for k, v in truth.items() if k != "chunk_digests"},
        "generate": {k: v for k, v in gen.items() if k != "chunk_digests"}, "build": built, "search": rows, "auto_choice": auto,
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(), "python": platform.python_version()},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ann_scale_n{args.n}_d{args.dim}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(report(result))
    print(report(result))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(r: dict) -> str:
    b = r["build"]
    lines = [f"# On-disk IVF-PQ at n = {r['n']:,}, dim {r['dim']} ({r['factory']})", "",
             f"- raw float32 size {r['raw_float32_gb']} GB; index on disk {b['index_bytes'] / 1e9:.2f} GB "
             f"(lists {b['ivfdata_bytes'] / 1e9:.2f} GB)",
             f"- exact top-{r['k']} of {r['queries']} queries: {r['groundtruth']['groundtruth_seconds']} s on "
             f"{r['groundtruth']['device_name']}; generate float16: {r['generate']['generate_seconds']} s; "
             f"build {b['build_seconds']} s (train {b['train_seconds']} s with k-means on {b['kmeans']}, "
             f"fill {b['fill_seconds']} s in {b['shards']} shards, merge {b['merge_seconds']} s)",
             f"- load average at the end {', '.join(f'{v:.1f}' for v in r['machine']['load_average_at_end'])} "
             f"on {r['machine']['cpus']} CPUs (other work shared them)", "",
             "| nprobe | rerank | recall@10 | queries/s | RSS MB (anon + file) |", "|---|---|---|---|---|"]
    for row in r["search"][1:]:
        lines.append(f"| {row['nprobe']} | {row['rerank']} | {row['recall_at_10']:.4f} | {row['queries_per_second']:.0f} "
                     f"| {row['rss_mb']:.0f} ({row['rss_anon_mb']:.0f} + {row['rss_file_mb']:.0f}) |")
    lines += ["", "auto choice for this n and dim: " + "; ".join(f"{k}: {v['factory']} ({v['storage']})"
                                                               for k, v in r["auto_choice"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
