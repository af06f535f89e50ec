"""`matsearch index build --engine ray`: the encoding stage of a build as a Ray Data pipeline over pipeline.py's
stages.

    slices of items (driver) -> pipeline.prepare_chunk on CPU tasks (read, hash, decode, model pixels)
    -> pipeline.embed_batch on a pool of actors, one model per GPU (num_gpus=1 each; CPU actors on a CPU build)
    -> pieces written in item order by the driver (pipeline.PieceWriter)

Everything else is build.py's: the plan, the piece files and their metadata, resuming from finished pieces,
skipped-file reports, --add, the manifest, publishing. `encode_with_ray` has the signature and result of the local
runner build._encode, so a build stopped under one engine resumes under the other and keeps its finished pieces.

The unit of work is a slice: up to `batch_size` consecutive items inside one shard, embedded in one forward pass.
Its batches are the local runner's wherever no item of the shard before them is skipped or already indexed (the
local runner fills each batch with `batch_size` images to encode); elsewhere they hold fewer images, so vectors may
differ from the local engine's in the last float bits. Pieces end at slice ends (at every shard's end, and once
`checkpoint_seconds` have passed), so a resumed Ray build cuts its slices as an uninterrupted one does.

Without `address` a local Ray is started (and stopped afterwards); with one (e.g. "auto" or "HOST:6379") the build
joins a cluster started with `ray start`; its workers must see SOURCE's files and the model folder at the same paths
as the driver (a shared file system).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from vision_model import weights_hash

from . import build as local
from . import pipeline
from .sources import ImageSource, SourceItem

log = logging.getLogger(__name__)


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RuntimeError("--engine ray needs Ray Data: pip install 'matmamba-search[distributed]' "
                           "(or pip install 'ray[data]')") from None
    return ray


def _slice_row(start: int, items: list[SourceItem], known: dict[str, list[str]]) -> dict:
    """One unit of work. File-backed items travel as JSON, array-backed ones (Fashion-MNIST) as one array; of the
    index's (key, sha256) pairs (--add), only those of the slice's keys travel with it."""
    row = {"start": start,
           "items": json.dumps([{"key": it.key, "label": it.label, "label_name": it.label_name,
                                 "path": None if it.path is None else str(it.path)} for it in items]),
           "known": json.dumps([[it.key, sha] for it in items for sha in known.get(it.key, ())])}
    if items and items[0].array is not None:
        row["arrays"] = np.stack([it.array for it in items])
    return row


def _prepare_slice(row: dict, config, max_pixels: int | None) -> dict:
    """A CPU task: pipeline.prepare_chunk over the slice's items."""
    arrays = row.get("arrays")
    items = [SourceItem(key=it["key"], label=it["label"], label_name=it["label_name"],
                        path=None if it["path"] is None else Path(it["path"]),
                        array=None if arrays is None else np.asarray(arrays[i]))
             for i, it in enumerate(json.loads(row["items"]))]
    known = frozenset(tuple(pair) for pair in json.loads(row["known"]))
    chunk = pipeline.prepare_chunk(items, int(row["start"]), config, known, max_pixels)
    return {"start": chunk.start, "stop": chunk.stop, "records": json.dumps(chunk.records),
            "seconds": json.dumps(chunk.seconds), "pixels": chunk.pixels.numpy()}


class _Embed:
    """An actor holding one model on its GPU (or the CPU): pipeline.embed_batch over each slice's pixels."""

    def __init__(self, model_dir: str, weights_sha256: str, views: str, device_type: str):
        from vision_model import load_model

        self.device = torch.device(device_type)  # Ray gives a GPU actor its own GPU as cuda:0
        self.model = load_model(model_dir, device=self.device)
        if weights_hash(self.model.source_dir) != weights_sha256:
            raise RuntimeError(f"the model in {model_dir} changed while the build ran")
        self.views = views

    def __call__(self, row: dict) -> dict:
        started = time.perf_counter()
        pixels = torch.from_numpy(np.ascontiguousarray(row["pixels"]))
        if len(pixels):
            embeddings = pipeline.embed_batch(self.model, pixels.to(self.device), self.views).cpu().numpy()
        else:
            embeddings = np.zeros((0, self.model.config.d_model), dtype=np.float32)
        return {"start": row["start"], "stop": row["stop"], "records": row["records"], "seconds": row["seconds"],
                "embeddings": embeddings, "encode_seconds": time.perf_counter() - started}


def _spread() -> dict:
    return {"scheduling_strategy": "SPREAD"}


def _pool_size(ray, device: torch.device, actors: int | None, gpus_per_actor: float | None) -> tuple[int, float]:
    """(actors, GPUs each): one actor per GPU of the cluster on a CUDA build; on a CPU build up to 2 CPU actors,
    leaving at least half the CPUs to decoding."""
    resources = ray.cluster_resources()
    if device.type != "cuda":
        return actors or max(1, min(2, int(resources.get("CPU", 1)) // 2)), 0.0
    gpus = int(resources.get("GPU", 0))
    per_actor = 1.0 if gpus_per_actor is None else gpus_per_actor
    if gpus == 0 or per_actor <= 0:
        raise RuntimeError(f"--engine ray on {device}: the Ray cluster has {gpus} GPUs; give --device cpu for CPU "
                           "actors, or start the cluster's workers with GPUs")
    return actors or max(1, int(gpus / per_actor)), per_actor


def encode_with_ray(src: ImageSource, model, device: torch.device, known: frozenset, shard_dir: Path, plan: str,
                    shard_size: int, batch_size: int, workers: int, max_pixels: int | None, progress: bool,
                    on_shard, on_checkpoint, views: str, checkpoint_seconds: float, *, address: str | None = None,
                    actors: int | None = None, gpus_per_actor: float | None = None) -> local._Encoded:
    """build._encode on Ray Data: same arguments, same piece files, same result.

    address: a running cluster to join (None: start a local Ray with `workers` CPUs for decoding plus one for each
    actor). actors: embedding actors (default: see _pool_size). gpus_per_actor: GPUs each actor reserves (default
    1; 0.5 puts two actors on one GPU). Each actor also takes one CPU, the decode tasks the rest.
    """
    ray = _require_ray()
    from ray.data import ActorPoolStrategy, DataContext

    items, n = src.items, len(src.items)
    result = local._resume(shard_dir, plan, n, shard_size)
    position = result.resumed_items
    known_shas: dict[str, list[str]] = {}
    for key, sha in known:
        known_shas.setdefault(key, []).append(sha)
    rows = [_slice_row(a, list(items[a:b]), known_shas) for a, b in pipeline.plan_chunks(n, position, shard_size,
                                                                                         batch_size)]
    skipped_count = sum(len(m["skipped"]) for m in result.metas)

    started_ray = not ray.is_initialized()
    if started_ray:
        local_actors = actors or (max(1, int(torch.cuda.device_count() / (gpus_per_actor or 1)))
                                  if device.type == "cuda" else 1)
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": max(1, workers) + local_actors}))
    ctx = DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    bar = local._progress_bar(n, position, skipped_count, progress)
    started = time.perf_counter()
    writer = pipeline.PieceWriter(model.config.d_model, local._on_written(n, shard_size, on_shard, on_checkpoint))
    piece = local._Piece(position)
    slices = None
    try:
        with writer:
            pool, per_actor = _pool_size(ray, device, actors, gpus_per_actor)
            log.info("ray engine: %d embedding actors on %s, %.2f GPU each", pool, device.type, per_actor)
            # slices come back in item order, so pieces are written at once
            ctx.execution_options.preserve_order = True
            ctx.enable_progress_bars = False  # the build's own bar counts images
            if rows:
                ds = ray.data.from_items(rows, override_num_blocks=len(rows))
                # decoding spreads over every node; remote args given by a function also keep Ray Data from
                # fusing these CPU tasks into the embedding actors (it fuses maps whose resources match, as CPU
                # actors' do)
                ds = ds.map(_prepare_slice, fn_args=(model.config, max_pixels), num_cpus=1,
                            ray_remote_args_fn=_spread)
                ds = ds.map(_Embed, fn_constructor_args=(str(model.source_dir), weights_hash(model.source_dir),
                                                         views, device.type),
                            compute=ActorPoolStrategy(size=pool), num_gpus=per_actor, num_cpus=1)
                slices = iter(ds.iter_rows())  # a generator: close() stops the pipeline
                while True:
                    waited = time.perf_counter()
                    row = next(slices, None)
                    piece.seconds["wait"] += time.perf_counter() - waited
                    if row is None:
                        break
                    start, stop = int(row["start"]), int(row["stop"])
                    for stage, seconds in json.loads(row["seconds"]).items():
                        piece.seconds[stage] += seconds
                    for offset, record in enumerate(json.loads(row["records"])):
                        piece.record(items[start + offset], record)
                        skipped_count += record[0] == "skip"
                    embeddings = np.array(row["embeddings"], dtype=np.float32).reshape(-1, model.config.d_model)
                    writer.put_batch(pipeline.EncodedBatch(torch.from_numpy(embeddings),
                                                           seconds=float(row["encode_seconds"])))
                    if (stop % shard_size == 0 or stop == n
                            or time.perf_counter() - piece.opened >= checkpoint_seconds):
                        piece = local._close_piece(result, writer, shard_dir, plan, piece, stop)
                    bar.update(stop - start)
                    bar.set_postfix(skipped=skipped_count, refresh=False)
    finally:
        bar.close()
        if slices is not None:
            slices.close()
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        if started_ray:
            ray.shutdown()
    result.seconds = time.perf_counter() - started
    return local._add_totals(result, src)
