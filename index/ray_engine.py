"""`matsearch index build --engine ray`: the encoding stage of a build as a Ray Data pipeline.

    list files (driver) -> read, hash and decode on CPU tasks -> embed on a pool of actors, one model per GPU
    (num_gpus=1 each; CPU actors where the cluster has no GPU) -> write shards (driver)

Everything else is the local engine's (build.py): the plan, the shard files and their metadata, skipped-file
reports, --add, the manifest, publishing. Only `encode_in_shards` differs, and it has the local
`_encode_in_shards`'s signature and result, so a build resumed with either engine keeps the other's finished
shards. The unit of work is a slice of `batch_size` consecutive items of one shard, so each forward pass sees
the batch the local engine would form (the same one wherever no file of the slice is skipped).

Without `address` a local Ray is started (and stopped afterwards); with one (e.g. "auto" or "HOST:6379") the
build joins a cluster started with `ray start`; workers must see SOURCE's files and the model folder at the
same paths as the driver (a shared file system).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from . import build as local
from .sources import SourceItem

log = logging.getLogger(__name__)

ADDRESS_ENV = "RAY_ADDRESS"


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RuntimeError("--engine ray needs Ray Data: pip install 'matmamba-search[distributed]' "
                           "(or pip install 'ray[data]')") from None
    return ray


def _slice_row(number: int, i: int, items: list[SourceItem]) -> dict:
    """One unit of work: file-backed items travel as JSON, array-backed ones (Fashion-MNIST) as one array."""
    row = {"shard": number, "slice": i,
           "items": json.dumps([{"key": it.key, "label": it.label, "label_name": it.label_name,
                                 "path": None if it.path is None else str(it.path)} for it in items])}
    if items and items[0].array is not None:
        row["arrays"] = np.stack([it.array for it in items])
    return row


def _decode_slice(row: dict, config, known: frozenset, max_pixels: int | None) -> dict:
    """A CPU task: read, hash, skip if indexed, decode and preprocess each item of a slice (build._prepare)."""
    import warnings

    from PIL import Image

    arrays = row.get("arrays")
    results, pixels = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # as the local engine: skip, not warn
        for i, it in enumerate(json.loads(row["items"])):
            item = SourceItem(key=it["key"], label=it["label"], label_name=it["label_name"],
                              path=None if it["path"] is None else Path(it["path"]),
                              array=None if arrays is None else np.asarray(arrays[i]))
            p = local._prepare(item, config, known, max_pixels)
            results.append({"key": it["key"], "label": it["label"], "label_name": it["label_name"],
                            "sha256": p.sha256, "width": p.width, "height": p.height,
                            "skip_reason": p.skip_reason, "already_indexed": p.already_indexed})
            if p.pixels is not None:
                pixels.append(p.pixels.numpy())
    shape = (0, config.in_chans, config.img_size, config.img_size)
    return {"shard": row["shard"], "slice": row["slice"], "results": json.dumps(results),
            "pixels": np.stack(pixels) if pixels else np.zeros(shape, dtype=np.float32)}


class _Embed:
    """An actor holding one model on its GPU (or the CPU): embeds a slice's images in one forward pass."""

    def __init__(self, model_dir: str, weights_sha256: str, views: str):
        from vision_model import load_model, weights_hash

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(model_dir, device=self.device)
        if weights_hash(self.model.source_dir) != weights_sha256:
            raise RuntimeError(f"the model in {model_dir} changed while the build ran")
        self.views = views

    def __call__(self, row: dict) -> dict:
        pixels = torch.from_numpy(np.ascontiguousarray(row["pixels"]))
        d = self.model.config.d_model
        embeddings = local._embed(self.model, self.device, pixels, self.views) if len(pixels) else \
            np.zeros((0, d), dtype=np.float32)
        return {"shard": row["shard"], "slice": row["slice"], "results": row["results"],
                "embeddings": embeddings, "device": str(self.device)}


def _spread() -> dict:
    return {"scheduling_strategy": "SPREAD"}


def cluster_gpus(ray) -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def encode_in_shards(src, model, device, known, shard_dir, plan, shard_size, batch_size, workers, max_pixels,
                     progress, on_shard, views, address: str | None = None, actors: int | None = None,
                     gpus_per_actor: float | None = None):
    """build._encode_in_shards on Ray Data: same arguments, same shard files, same result.

    address: a running cluster to join (None: start a local Ray). actors: embedding actors (default: one per
    GPU of the cluster; where it has none, up to 2 CPU actors leaving half the CPUs to decoding). gpus_per_actor: GPUs each
    actor reserves (default 1; 0.5 puts two actors on one GPU). Each actor also takes one CPU, the decode tasks
    the rest.
    """
    ray = _require_ray()
    from ray.data import ActorPoolStrategy, DataContext

    shards = [list(src.items[start:start + shard_size]) for start in range(0, len(src.items), shard_size)]
    result = local._Encoded([local._shard_path(shard_dir, i) for i in range(len(shards))], shards_total=len(shards))
    todo = [number for number, items in enumerate(shards)
            if not local._is_finished(local._read_shard_meta(result.shard_files[number]), plan, number, items)]
    result.shards_resumed = len(shards) - len(todo)
    slices = {number: [shards[number][s:s + batch_size] for s in range(0, len(shards[number]), batch_size)]
              for number in todo}

    started_ray = not ray.is_initialized()
    if started_ray:  # a local Ray: `workers` CPUs for decoding, plus one for each embedding actor
        local_gpus = torch.cuda.device_count()
        local_actors = actors or (max(1, int(local_gpus / (gpus_per_actor or 1))) if local_gpus else 1)
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": workers + local_actors}))
    started = time.perf_counter()
    try:
        gpus = cluster_gpus(ray)
        per_actor = gpus_per_actor if gpus_per_actor is not None else (1.0 if gpus else 0.0)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        pool = actors or (max(1, int(gpus / per_actor)) if per_actor else max(1, min(2, cpus // 2)))
        log.info("ray engine: %d embedding actors, %.2f GPU each (%d GPUs in the cluster)", pool, per_actor, gpus)
        ctx = DataContext.get_current()
        ctx.execution_options.preserve_order = True  # shards complete in order, so each is written at once
        ctx.enable_progress_bars = progress
        rows = [_slice_row(number, i, piece) for number in todo for i, piece in enumerate(slices[number])]
        if rows:
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            # decoding spreads over every node; remote args given by a function also keep Ray Data from fusing
            # these CPU tasks into the embedding actors (it fuses maps whose resources match, as CPU actors' do)
            ds = ds.map(_decode_slice, fn_args=(model.config, known, max_pixels), num_cpus=1,
                        ray_remote_args_fn=_spread)
            ds = ds.map(_Embed, fn_constructor_args=(str(model.source_dir), local.weights_hash(model.source_dir),
                                                     views),
                        compute=ActorPoolStrategy(size=pool), num_gpus=per_actor, num_cpus=1)
            pending: dict[int, list] = {}
            done = 0
            for row in ds.iter_rows():
                number = int(row["shard"])
                pending.setdefault(number, []).append(row)
                if len(pending[number]) < len(slices[number]):
                    continue
                embeddings, meta = _assemble_shard(pending.pop(number), model.config.d_model)
                meta.update(plan=plan, shard=number, count=len(shards[number]))
                local._write_shard(result.shard_files[number], embeddings, meta)
                result.items_processed += len(shards[number])
                done += 1
                if on_shard is not None:
                    on_shard(result.shards_resumed + done, len(shards))
    finally:
        if started_ray:
            ray.shutdown()
    result.seconds = time.perf_counter() - started

    for path in result.shard_files:  # totals over every shard, resumed ones included (as the local engine)
        meta = local._read_shard_meta(path)
        result.indexed += len(meta["indexed"])
        result.already_indexed += meta["already_indexed"]
        result.skipped.extend({"key": s["key"], "source": src.spec, "reason": s["reason"]} for s in meta["skipped"])
    return result


def _assemble_shard(rows: list[dict], d: int) -> tuple[np.ndarray, dict]:
    """One shard's embeddings and metadata (build._encode_shard's format) from its slices' results."""
    indexed, skipped, already, chunks = [], [], 0, []
    for row in sorted(rows, key=lambda r: int(r["slice"])):
        for r in json.loads(row["results"]):
            if r["already_indexed"]:
                already += 1
            elif r["skip_reason"] is not None:
                log.info("skipping %s: %s", r["key"], r["skip_reason"])
                skipped.append({"key": r["key"], "reason": r["skip_reason"]})
            else:
                indexed.append({k: r[k] for k in ("key", "label", "label_name", "sha256", "width", "height")})
        chunks.append(np.asarray(row["embeddings"], dtype=np.float32).reshape(-1, d))
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, d), dtype=np.float32)
    return embeddings, {"indexed": indexed, "skipped": skipped, "already_indexed": already}
