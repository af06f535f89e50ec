"""The clip-art run on one GPU, in one command: self-supervised training (time-boxed), a supervised reference
(time-boxed), the folder evaluation against every baseline, and the shippable model folder with its card.

    python3 -m benchmarks.gpu.ssl_clipart --pack .data/clipart --out $OUT          # the GPU run (about 9 minutes)
    python3 -m benchmarks.gpu.ssl_clipart --folder DIR --tiny --out /tmp/x         # CPU smoke test, tiny model

Writes to --out (8 files): model/{model.safetensors, config.json, README.md} (the encoder and its card, ready for
vision_model/weights/matmamba_vision_openclipart_ssl), report.md, report.json, report.png (topic retrieval and copy
detection of every encoder), ssl_metrics.jsonl (the training curve) and runs.json (both runs' results and settings).
The supervised reference trains on the topic labels of the images that are *not* topic queries.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation import folder_eval
from training.cache import build_cache, open_cache, topic_of
from training.ssl import write_model_card
from training.train import TrainConfig, train
from vision_model.config import get_config

from .pack_clipart import unpack

MODEL = "matmamba_vision_clipart"
SHIPPED_NAME = "matmamba_vision_openclipart_ssl"
UNLABELLED = ("unsorted",)
QUERY_FRACTION = 0.2
TINY = {"img_size": 32, "d_model": 64, "depth": 2, "d_state": 16}


def labelled_tree(cache, directory: Path) -> Path:
    """An ImageFolder tree (topic/NNNNN.png) of the labelled images that are not topic queries."""
    labels, names = folder_eval.topic_labels(cache.keys, UNLABELLED)
    queries = folder_eval.query_rows(cache.keys, QUERY_FRACTION)
    rows = [i for i in range(len(cache)) if labels[i] >= 0 and not queries[i]]
    for name in names:
        (directory / name).mkdir(parents=True, exist_ok=True)

    def write(i):
        Image.fromarray(np.ascontiguousarray(cache.images[i].transpose(1, 2, 0))).save(
            directory / topic_of(cache.keys[i]) / f"{i:05d}.png", compress_level=1)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, rows))
    return directory


def probe_batch(cache, config, candidates, local_crops: int, temperature: float, steps: int = 4) -> dict:
    """Images/s of a full self-supervised step at each batch size (after two warm-up steps each), on the GPU.
    A small encoder at 96 px is bound by kernel launches, not arithmetic, at small batches: a larger batch then
    costs about the same time per step."""
    import torch

    from training.cache import uint8_batch
    from training.ssl import SSLNet, make_views, ssl_losses
    from vision_model.model import MatMambaVision

    device = torch.device("cuda")
    net = SSLNet(MatMambaVision(config)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16)
    rates = {}
    for b in candidates:
        x = uint8_batch(cache, np.arange(b) % len(cache), device)
        for i in range(2 + steps):
            if i == 2:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            g, l = make_views(x, config, local_crops, torch.Generator().manual_seed(i))
            loss, _ = ssl_losses(net, g, l, (1, 2, 4, 8), temperature, amp, 0.5)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        rates[b] = b * steps / (time.perf_counter() - t0)
        print(f"probe: batch {b}: {rates[b]:.0f} img/s ({(time.perf_counter() - t0) / steps * 1000:.0f} ms a step)",
              flush=True)
    del net, opt
    torch.cuda.empty_cache()
    return rates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pack", default=".data/clipart", help="pack folder (benchmarks/gpu/pack_clipart.py)")
    p.add_argument("--folder", help="instead of --pack: a folder of images, decoded here")
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/ssl_clipart", help="scratch: cache, checkpoints, the labelled tree")
    # the defaults are the shipped model's run (results/runs/openclipart-ssl-h200-v5)
    p.add_argument("--ssl-minutes", type=float, default=6.5)
    p.add_argument("--sup-minutes", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=1024,
                   help="0: the smallest of --probe-batches within 10 %% of the fastest on the GPU (512 on the CPU)")
    p.add_argument("--probe-batches", default="512,1024,2048")
    p.add_argument("--lr", type=float, default=1.5e-3, help="at batch 512; scaled by sqrt(batch / 512)")
    p.add_argument("--temperature", type=float, default=0.15)
    p.add_argument("--feature-nce", type=float, default=0.0)
    p.add_argument("--local-crops", type=int, default=4)
    p.add_argument("--copies", type=int, default=500)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: a tiny model, few images, few steps")
    args = p.parse_args(argv)
    try:  # the evaluation searches with FAISS: fail before minutes of training, not after
        import faiss  # noqa: F401
    except ImportError:
        raise SystemExit("ssl_clipart: faiss is not importable (the evaluation needs it): install faiss-cpu, or carry "
                         "its wheel to the GPU machine")
    started = time.time()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    runs = {"batch_probe_images_per_s": None}

    def save_runs() -> None:  # after each stage, so a later failure keeps what finished
        runs["wall_seconds"] = time.time() - started
        (out / "runs.json").write_text(json.dumps(runs, indent=2, default=str))
    overrides = dict(TINY) if args.tiny else {}
    config = get_config(MODEL, **overrides)
    if args.folder:
        cache = build_cache(args.folder, work / f"cache{config.img_size}", config.img_size, config.crop,
                            limit=96 if args.tiny else None)
    else:
        cache = open_cache(unpack(args.pack, work / "cache"))
    print(f"{len(cache)} images at {cache.size} px ({time.time() - started:.0f} s)")
    batch, probe = args.batch_size, None
    if not batch and not args.tiny and _cuda():
        probe = probe_batch(cache, config, [int(b) for b in args.probe_batches.split(",")], args.local_crops,
                            args.temperature)
        best = max(probe.values())
        batch = min(b for b, r in probe.items() if r >= 0.9 * best)  # the smallest within 10 % of the fastest
        print(f"batch {batch} ({probe[batch]:.0f} img/s)")
    batch = batch or 512
    lr = args.lr * (batch / 512) ** 0.5
    warmup = max(5.0, 60 * batch / len(cache))  # at least 60 warm-up steps
    small = dict(epochs=3, batch_size=16, ckpt_every=4) if args.tiny else dict(epochs=5000, batch_size=batch)
    trained_on = f"clip art (Debian's openclipart-png, {len(cache):,} images, no labels)"
    ssl_tc = TrainConfig(model=MODEL, overrides={**overrides, "trained_on": trained_on}, data=str(cache.directory),
                         objective="self-supervised",
                         out=str(work / "ssl"), lr=lr, warmup_epochs=warmup, weight_decay=0.05,
                         temperature=args.temperature, local_crops=args.local_crops, feature_nce=args.feature_nce,
                         max_minutes=None if args.tiny else args.ssl_minutes, **small)
    ssl_result = train(ssl_tc)
    runs.update(batch_probe_images_per_s=probe, ssl={"result": ssl_result, "train_config": ssl_tc.__dict__})
    shutil.copyfile(work / "ssl" / "metrics.jsonl", out / "ssl_metrics.jsonl")
    save_runs()
    tree = labelled_tree(cache, work / "labelled")
    sup_tc = TrainConfig(model=MODEL, overrides=overrides, data=f"imagefolder:{tree}", out=str(work / "supervised"),
                         lr=2e-3, warmup_epochs=2, val_fraction=0.05, workers=2 if args.tiny else 12,
                         max_minutes=None if args.tiny else args.sup_minutes,
                         **({**small, "epochs": 1} if args.tiny else dict(epochs=200, batch_size=256)))
    sup_result = train(sup_tc)
    runs["supervised"] = {"result": sup_result, "train_config": sup_tc.__dict__}
    save_runs()
    model_dir = out / "model"
    shutil.copytree(work / "ssl" / "model", model_dir, dirs_exist_ok=True)
    compare = ["pixels", "random", "shipped", f"supervised reference (topic labels)={work / 'supervised' / 'model'}"]
    encoders = folder_eval.load_encoders(str(model_dir), compare, "cuda" if not args.tiny and _cuda() else "cpu", 512)
    encoders[0].name = f"{SHIPPED_NAME} (self-supervised)"
    title = f"{SHIPPED_NAME}: openclipart-png, topic retrieval and copy detection"
    result = folder_eval.evaluate_folder(cache, encoders, QUERY_FRACTION, 20 if args.tiny else args.copies,
                                         UNLABELLED, crop=config.crop)
    result["eval_seconds"] = time.time() - started
    (out / "report.json").write_text(json.dumps(result, indent=2))
    (out / "report.md").write_text(folder_eval.markdown(result, title))
    folder_eval.plot(result, out / "report.png", title)
    save_runs()
    write_model_card(model_dir, result, SHIPPED_NAME)
    print(folder_eval.markdown(result, title))
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    print(f"done in {time.time() - started:.0f} s: {files}")
    return 0


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
