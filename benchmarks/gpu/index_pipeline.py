"""GPU run (not part of CI): index-build throughput with CPU and GPU JPEG decoding against encoder-only, in one go.

    pip install .data/wheels/faiss_cpu-*.whl      # the GPU machine has no faiss
    python3 -m benchmarks.gpu.index_pipeline --out $OUT [--budget 540]

(Fashion-MNIST is read from $MATSEARCH_FASHION_MNIST, else from .data/fmnist when that folder exists.)

1. Photos: --photos (20,000) JPEGs of 640x480 to 4000x3000, made on this machine in parallel: --unique (3,000)
   procedural scenes with grain, the rest byte copies of them with distinct trailing bytes (ignored by decoders,
   so every file has its own sha256; decoding costs what the original costs).
2. The 35M config (random weights) at 224 px, bf16: encoder-only img/s on pre-decoded pixels, then `index build`
   of all the photos with --decode gpu and with --decode cpu, each with its stage breakdown
   (benchmarks/index_build.py); the indexes are kept for step 3.
3. GPU against CPU decoding: model pixels of --pixel-sample photos from both decoders (max/mean abs difference),
   the cosine of each photo's two vectors, recall@10 of the GPU-decoded index against the CPU-decoded one over the
   first --subset (2,000) photos (all distinct; the byte copies would make ties).
4. Per-image decode cost per photo size: nvJPEG batch decode (wall and host CPU ms per image; host CPU near wall
   means the host does the Huffman decoding), the same as progressive JPEGs (nvJPEG's hybrid path), the full
   device decoder (decode + preprocessing), and Pillow's draft decode on one core.
5. The shipped Fashion-MNIST model on fashion-mnist:train (arrays: --decode auto takes the CPU path).
6. bf16 against fp32 on fashion-mnist:test (cosine, recall@10).
A table is printed last; at most 5 files under --out (results.json holds everything). --budget: phases that would
not fit in what is left are skipped, and results.json is written after every phase.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch


def copies(folder: Path, unique: int, total: int) -> None:
    """photo-NNNNNN.jpg for unique..total-1: the bytes of photo (i % unique) plus 8 trailing bytes of i."""
    from concurrent.futures import ThreadPoolExecutor

    def copy(i: int) -> None:
        path = folder / f"photo-{i:06d}.jpg"
        if not path.exists():
            data = (folder / f"photo-{i % unique:06d}.jpg").read_bytes()
            path.write_bytes(data + i.to_bytes(8, "little"))

    with ThreadPoolExecutor(16) as pool:  # file I/O: threads suffice
        list(pool.map(copy, range(unique, total)))


def bf16_check(n: int = 10_000, device: str = "cuda") -> dict:
    import numpy as np

    import vision_model
    from index.sources import open_source
    from index.pipeline import embed_batch
    from vision_model.preprocess import to_model_input

    model = vision_model.load_model(device=device).eval()
    src = open_source("fashion-mnist:test", n)
    pixels = torch.from_numpy(np.stack([item.array for item in src.items])).to(device)
    bf16 = torch.cat([embed_batch(model, pixels[i:i + 1024]) for i in range(0, len(pixels), 1024)])
    with torch.inference_mode():
        fp32 = torch.cat([torch.nn.functional.normalize(model.embed(to_model_input(model.config, pixels[i:i + 1024]),
                                                                    level=1).float(), dim=-1)
                          for i in range(0, len(pixels), 1024)])
        cos = (bf16 * fp32).sum(-1)
        top_b = (bf16 @ bf16.T).topk(11, dim=1).indices[:, 1:]
        top_f = (fp32 @ fp32.T).topk(11, dim=1).indices[:, 1:]
        hits = (top_b[:, :, None] == top_f[:, None, :]).any(-1).float().mean().item()
    return {"items": len(pixels), "cosine_min": round(cos.min().item(), 5), "cosine_mean": round(cos.mean().item(), 6),
            "recall_at_10_vs_fp32": round(hits, 4)}


def _keys_rows(store) -> dict[str, int]:
    import numpy as np
    return {row["key"]: i for i, row in enumerate(store.metadata(np.arange(len(store))))}


def agreement(photos: Path, cpu_dir: Path, gpu_dir: Path, unique: int, subset: int, sample: int,
              device: str = "cuda") -> dict:
    """Pixels, vectors and neighbours of the GPU-decoded build against the CPU-decoded one."""
    import numpy as np

    import vision_model
    from index import IndexStore
    from index.jpeg_batch import JpegBatchDecoder, JpegJob
    from index.pipeline import prepare_item
    from index.sources import SourceItem
    from vision_model.images import read_header

    a, b = IndexStore.open(cpu_dir, device="cpu"), IndexStore.open(gpu_dir, device="cpu")
    rows_a, rows_b = _keys_rows(a), _keys_rows(b)
    keys = sorted(set(rows_a) & set(rows_b))
    va = np.asarray(a.vectors)[[rows_a[k] for k in keys]]
    vb = np.asarray(b.vectors)[[rows_b[k] for k in keys]]
    cos = (va * vb).sum(1)
    out = {"items_cpu": len(rows_a), "items_gpu": len(rows_b), "common": len(keys),
           "cosine_min": round(float(cos.min()), 5), "cosine_p001": round(float(np.quantile(cos, 0.001)), 5),
           "cosine_mean": round(float(cos.mean()), 6)}
    first = [i for i, k in enumerate(keys) if int(k.split("-")[1].split(".")[0]) < unique][:subset]
    sa, sb = torch.from_numpy(va[first]).to(device), torch.from_numpy(vb[first]).to(device)

    def top10(v):
        sims = v @ v.T
        sims.fill_diagonal_(-float("inf"))
        return sims.topk(min(10, len(v) - 1), dim=1).indices

    ta, tb = top10(sa), top10(sb)
    out["recall_at_10"] = round((tb[:, :, None] == ta[:, None, :]).any(-1).float().mean().item(), 4)
    out["recall_subset"] = len(first)

    config = vision_model.get_config("matmamba_vision_35m")
    decoder = JpegBatchDecoder(config, device)
    names = [f"photo-{i:06d}.jpg" for i in range(min(sample, unique))]
    maxes, means = [], []
    for start in range(0, len(names), 64):
        jobs, want = [], []
        for slot, name in enumerate(names[start:start + 64]):
            data = (photos / name).read_bytes()
            h = read_header(data)
            jobs.append(JpegJob(slot, torch.frombuffer(bytearray(data), dtype=torch.uint8), h.width, h.height,
                                h.orientation))
            want.append(prepare_item(SourceItem(name, path=photos / name), config).pixels)
        got = decoder.decode(jobs).pixels.cpu()
        diff = (got.int() - torch.stack(want).int()).abs()
        maxes += diff.flatten(1).max(1).values.tolist()
        means += diff.flatten(1).float().mean(1).tolist()
    maxes = np.array(maxes)
    out["pixels"] = {"images": len(maxes), "max_abs_max": int(maxes.max()),
                     "max_abs_p50": float(np.median(maxes)), "max_abs_p99": float(np.quantile(maxes, 0.99)),
                     "mean_abs_mean": round(float(np.mean(means)), 3)}
    return out


def decode_cost(photos: Path, unique: int, per_size: int = 48, device: str = "cuda") -> list[dict]:
    """ms per image of each decoder, per photo size (see the module's docstring, step 4)."""
    import io

    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    import vision_model
    from index.jpeg_batch import JpegBatchDecoder, JpegJob
    from vision_model.images import decode_image, read_header

    by_size: dict[tuple, list[bytes]] = {}
    for i in range(unique):
        data = (photos / f"photo-{i:06d}.jpg").read_bytes()
        h = read_header(data)
        group = by_size.setdefault((h.width, h.height), [])
        if len(group) < per_size:
            group.append(data)
    config = vision_model.get_config("matmamba_vision_35m")
    decoder = JpegBatchDecoder(config, device)

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    def tensors(blobs):
        return [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]

    def timed(fn, n):
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        return round((time.perf_counter() - wall) * 1e3 / n, 3), round((time.process_time() - cpu) * 1e3 / n, 3)

    decode_jpeg(tensors(next(iter(by_size.values()))[:4]), device=device, mode=ImageReadMode.RGB)  # initialise
    rows = []
    for (w, h), blobs in sorted(by_size.items(), key=lambda kv: kv[0][0] * kv[0][1]):
        batch = tensors(blobs)
        row = {"size": f"{w}x{h}", "megapixels": round(w * h / 1e6, 2), "images": len(blobs),
               "kilobytes_mean": round(sum(map(len, blobs)) / len(blobs) / 1e3)}
        row["nvjpeg_ms"], row["nvjpeg_host_cpu_ms"] = timed(
            lambda: decode_jpeg(batch, device=device, mode=ImageReadMode.RGB), len(blobs))
        jobs = [JpegJob(i, t, w, h) for i, t in enumerate(batch)]
        row["device_decoder_ms"], row["device_decoder_host_cpu_ms"] = timed(lambda: decoder.decode(jobs), len(blobs))
        progressive = []
        for b in blobs[:4]:
            buffer = io.BytesIO()
            Image.open(io.BytesIO(b)).save(buffer, "JPEG", quality=90, progressive=True)
            progressive.append(buffer.getvalue())
        pb = tensors(progressive)
        row["nvjpeg_progressive_ms"], row["nvjpeg_progressive_host_cpu_ms"] = timed(
            lambda: decode_jpeg(pb, device=device, mode=ImageReadMode.RGB), len(pb))
        start = time.process_time()
        for b in blobs[:8]:
            decode_image(b, target_size=256)
        row["pillow_draft_cpu_ms"] = round((time.process_time() - start) * 1e3 / len(blobs[:8]), 3)
        row["nvjpeg_megapixels_per_second"] = round(w * h / 1e6 / (row["nvjpeg_ms"] / 1e3))
        rows.append(row)
        print(f"decode cost {row}", flush=True)
    return rows


def _bench(source: str, out: Path, model: str | None, batch: int, seconds: float, decode: str,
           keep: Path | None, device: str = "cuda") -> dict:
    from benchmarks import index_build

    parser = argparse.ArgumentParser()
    index_build.add_arguments(parser)
    argv = ["--source", source, "--device", device, "--batch-size", str(batch), "--encoder-seconds", str(seconds),
            "--decode", decode, "--out", str(out)]
    if model:
        argv += ["--model", model]
    if keep:
        argv += ["--keep-index", str(keep)]
    index_build.run(parser.parse_args(argv))
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--photos", type=int, default=20_000)
    parser.add_argument("--unique", type=int, default=3_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/index-pipeline"), help="photos and indexes")
    parser.add_argument("--encoder-seconds", type=float, default=8.0)
    parser.add_argument("--subset", type=int, default=2_000, help="photos in the recall@10 comparison")
    parser.add_argument("--pixel-sample", type=int, default=256, help="photos in the pixel comparison")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run")
    parser.add_argument("--device", default="cuda", help="cuda; cpu for a smoke test with a few photos")
    parser.add_argument("--model", default="matmamba_vision_35m", help="config (random weights) for the photos")
    parser.add_argument("--batch-size", type=int, default=256, help="for the photos")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["photos", "cpu", "gpu", "agreement", "cost", "fmnist", "bf16"])
    args = parser.parse_args()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("MATSEARCH_FASHION_MNIST") and Path(".data/fmnist").is_dir():
        os.environ["MATSEARCH_FASHION_MNIST"] = str(Path(".data/fmnist").resolve())
    from benchmarks.photos import make_photos

    device = args.device
    results = {"device": torch.cuda.get_device_name() if device != "cpu" else "cpu",
               "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, "model": args.model,
               "skipped_for_budget": []}
    try:
        import torchvision
        results["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    from index import jpeg_batch
    results["nvjpeg_unavailable"] = jpeg_batch.unavailable_reason(device)
    results["hardware_jpeg_engine"] = jpeg_batch.hardware_engine(device)
    if Path("/dev/shm").is_dir():  # the worker processes hand JPEG bytes over through shared memory
        results["dev_shm_free_gb"] = round(shutil.disk_usage("/dev/shm").free / 1e9, 1)
    print(f"nvJPEG: {results['nvjpeg_unavailable'] or 'available'}; hardware engine: "
          f"{results['hardware_jpeg_engine']}; /dev/shm free: {results.get('dev_shm_free_gb')} GB", flush=True)

    def save() -> None:
        results["seconds"] = round(time.perf_counter() - started, 1)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    def attempt(name: str, fn):
        """Run one phase; a failure is recorded and the run goes on with the next phase."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one GPU run: keep what the other phases measure
            import traceback
            traceback.print_exc()
            results[f"{name}_error"] = f"{type(e).__name__}: {e}"
            save()
            return None

    def fits(name: str, estimate: float) -> bool:
        """Whether phase `name` (about `estimate` seconds) is wanted and fits in what is left of the budget."""
        if name in args.skip:
            return False
        if time.perf_counter() - started + estimate > args.budget:
            print(f"skipping {name}: ~{estimate:.0f} s would overrun the budget", flush=True)
            results["skipped_for_budget"].append(name)
            return False
        return True

    photos = args.work / "photos"
    unique = min(args.unique, args.photos)
    per_photo = 1 / 400  # seconds per photo a build takes, at worst (the CPU path measured 467 img/s)
    if "photos" not in args.skip:
        start = time.perf_counter()
        make_photos(photos, unique, use_wallpapers=False)
        copies(photos, unique, args.photos)
        results["photo_seconds"] = round(time.perf_counter() - start, 1)
        print(f"{args.photos} photos in {results['photo_seconds']} s", flush=True)
        save()
        for decode in ("gpu", "cpu"):
            if decode == "gpu" and results["nvjpeg_unavailable"]:
                continue
            if fits(decode, args.photos * per_photo + args.encoder_seconds + 30):
                results[f"photos_35m_{decode}"] = attempt(decode, lambda: _bench(
                    str(photos), args.out / f"photos_35m_{decode}.json", args.model, args.batch_size,
                    args.encoder_seconds, decode, args.work / f"index-{decode}", device))
                save()
        if results.get("photos_35m_gpu") and results.get("photos_35m_cpu") and fits("agreement", 60):
            results["agreement"] = attempt("agreement", lambda: agreement(
                photos, args.work / "index-cpu", args.work / "index-gpu", unique, args.subset, args.pixel_sample,
                device))
            print(f"agreement {results['agreement']}", flush=True)
            save()
        if not results["nvjpeg_unavailable"] and fits("cost", 60):
            results["decode_cost"] = attempt("cost", lambda: decode_cost(photos, unique, device=device))
            save()
        shutil.rmtree(args.work, ignore_errors=True)
    if fits("fmnist", 90):
        results["fmnist_shipped"] = attempt("fmnist", lambda: _bench(
            "fashion-mnist:train", args.out / "fmnist_shipped.json", None, 1024, args.encoder_seconds, "auto", None,
            device))
        save()
    if fits("bf16", 30):
        results["bf16_vs_fp32"] = attempt("bf16", lambda: bf16_check(device=device))
    save()
    _table(results)
    return 0


def _table(results: dict) -> None:
    print(f"\n{results['device']}, {results['cores']} cores, torch {results['torch']}, "
          f"torchvision {results.get('torchvision')}; {results['seconds']} s")
    print(f"{'run':<18} {'items':>7} {'encoder img/s':>14} {'build img/s':>12} {'ratio':>6}  stage seconds")
    for name in ("photos_35m_gpu", "photos_35m_cpu", "fmnist_shipped"):
        r = results.get(name)
        if r:
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["build"]["stage_seconds"].items())
            print(f"{name:<18} {r['items']:>7} {r['encoder_only']['images_per_second']:>14.0f} "
                  f"{r['build']['images_per_second']:>12.0f} {r['build_vs_encoder']:>6.0%}  {stages}")
            if r["build"].get("decode") == "gpu":
                print(f"{'':<18} decoded on the device {r['build']['decoded_on_device']}, rejected and decoded on "
                      f"the CPU {r['build']['device_decode_fallbacks']}")
    if results.get("agreement"):
        a = results["agreement"]
        print(f"gpu vs cpu decoding: cosine min {a['cosine_min']} mean {a['cosine_mean']}; recall@10 "
              f"{a['recall_at_10']} over {a['recall_subset']} photos; pixels {a['pixels']}")
    if results.get("decode_cost"):
        print(f"{'size':<10} {'MP':>5} {'KB':>6} {'nvjpeg ms':>10} {'host cpu':>9} {'MP/s':>6} {'progr. ms':>10} "
              f"{'host cpu':>9} {'device dec ms':>14} {'pillow draft ms':>16}")
        for r in results["decode_cost"]:
            print(f"{r['size']:<10} {r['megapixels']:>5} {r['kilobytes_mean']:>6} {r['nvjpeg_ms']:>10} "
                  f"{r['nvjpeg_host_cpu_ms']:>9} {r['nvjpeg_megapixels_per_second']:>6} "
                  f"{r['nvjpeg_progressive_ms']:>10} {r['nvjpeg_progressive_host_cpu_ms']:>9} "
                  f"{r['device_decoder_ms']:>14} {r['pillow_draft_cpu_ms']:>16}")
    if results.get("bf16_vs_fp32"):
        print(f"bf16 vs fp32: {results['bf16_vs_fp32']}")
    for key, value in results.items():
        if key.endswith("_error"):
            print(f"{key}: {value}")
    if results["skipped_for_budget"]:
        print(f"skipped for the budget: {', '.join(results['skipped_for_budget'])}")


if __name__ == "__main__":
    raise SystemExit(main())
