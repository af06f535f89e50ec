"""`matsearch index build SOURCE --out DIR ...` and `matsearch index info DIR`."""
from __future__ import annotations

import argparse
import json

from vision_model.views import DEFAULT_VIEWS, VIEW_SETS, describe

from index.index_types import NAMED_TYPES

MAX_SKIPPED_SHOWN = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="index_command", metavar="ACTION")
    parser.set_defaults(index_parser=parser)

    build = actions.add_parser(
        "build", help="index the images of SOURCE into DIR (resumable; --add extends an index)",
        description="Encode every image of SOURCE with the full model and store a FAISS index of the embeddings. "
                    "A killed build resumes where it stopped when run again with the same arguments.")
    build.add_argument("source", metavar="SOURCE",
                       help="fashion-mnist:train, fashion-mnist:test, imagefolder:DIR (labels from class "
                            "subfolders), or a folder of images (searched recursively)")
    build.add_argument("--out", required=True, metavar="DIR", help="index folder (created if needed)")
    build.add_argument("--model", metavar="DIR", help="saved model folder (default: the shipped model; with "
                                                      "--add, the model the index was built with)")
    build.add_argument("--index-type", metavar="TYPE",
                       help=f"{' | '.join(NAMED_TYPES)} | a FAISS factory string such as 'IVF1024,PQ32' "
                            "(default: flat; with --add, the index's own type). auto picks flat, HNSW, IVF-Flat, "
                            "IVF-PQ in RAM or IVF-PQ on disk (memory-mapped lists) for --memory-budget-mb and says "
                            "why in the manifest; ondisk forces the last")
    build.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    build.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    build.add_argument("--workers", type=int, help="image decoding processes (default: one per CPU core; 0: decode in "
                                                   "the main process)")
    build.add_argument("--add", action="store_true",
                       help="index only images (key + content hash) the index lacks, with the index's model")
    build.add_argument("--memory-budget-mb", type=float, default=4096,
                       help="memory the index may take, for --index-type auto (default 4096)")
    build.add_argument("--limit", type=int, help="index only the first N images of SOURCE (quick runs)")
    build.add_argument("--shard-size", type=int, default=2048, help="images per shard: batches restart at each "
                                                                    "(default 2048)")
    build.add_argument("--checkpoint-seconds", type=float, default=20.0,
                       help="save the work at least this often, so a killed build resumes from there (default 20)")
    build.add_argument("--max-image-pixels", type=int,
                       help="skip larger images as possible decompression bombs (default: Pillow's limit)")
    build.add_argument("--views", choices=list(VIEW_SETS), metavar="SET",
                       help="embed each image as the average of these views: 1 (default), flip, shift1 (10 views), "
                            "shift2 (18): more build compute for better 1-NN at every query level (docs/notes.md "
                            "section 17); with --add: the index's own")
    build.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local: this process (default); ray: a Ray Data pipeline, CPU tasks decoding and one "
                            "embedding actor per GPU (needs pip install 'matmamba-search[distributed]')")
    build.add_argument("--address", metavar="ADDR",
                       help="with --engine ray: join the Ray cluster at ADDR (e.g. auto, or HOST:6379 of `ray start "
                            "--head`); default: start a local Ray for this build")
    build.add_argument("--ray-actors", type=int, metavar="N",
                       help="with --engine ray: embedding actors (default: one per GPU; CPU actors where none)")
    build.add_argument("--ray-gpus-per-actor", type=float, metavar="F",
                       help="with --engine ray: GPUs each actor reserves (default 1; 0.5 shares a GPU between two)")
    build.add_argument("--decode", choices=("auto", "cpu", "gpu"), default="auto",
                       help="where JPEGs are decoded: cpu (the worker processes, Pillow draft mode), gpu (the workers "
                            "read and hash them, the encoder's device decodes them in batches: nvJPEG on CUDA; other "
                            "formats, progressive JPEGs and files it rejects are decoded on the CPU), auto (default: "
                            "gpu on a CUDA GPU with a hardware JPEG engine (A100, H100, H200) when torchvision can "
                            "decode JPEGs there and SOURCE is files, else cpu)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.add_argument("--debug", action="store_true", help="show tracebacks on errors")

    info = actions.add_parser("info", help="summarise the index in DIR", description="Summarise an index.")
    info.add_argument("directory", metavar="DIR", help="index folder")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    info.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def run(args: argparse.Namespace) -> int:
    if args.index_command == "build":
        return _build(args)
    if args.index_command == "info":
        return _info(args)
    args.index_parser.print_help()
    return 2


def _build(args: argparse.Namespace) -> int:
    from index.build import build_index

    result = build_index(args.source, args.out, model_dir=args.model, index_type=args.index_type,
                         batch_size=args.batch_size, device=args.device, workers=args.workers, add=args.add,
                         memory_budget_mb=args.memory_budget_mb, progress=not args.no_progress, limit=args.limit,
                         shard_size=args.shard_size, max_image_pixels=args.max_image_pixels, views=args.views,
                         checkpoint_seconds=args.checkpoint_seconds, engine=args.engine, address=args.address,
                         ray_actors=args.ray_actors, ray_gpus_per_actor=args.ray_gpus_per_actor, decode=args.decode)
    manifest = result.manifest
    verb = "added" if args.add else "indexed"
    print(f"{verb} {result.added} images from {args.source}: {manifest['count']} in {result.version_dir} "
          f"({manifest['index_factory']}, dim {manifest['embedding_dim']})")
    if manifest.get("index_type") == "auto":
        print(f"index type (auto): {manifest['index_choice']}")
    _print_skipped(result.skipped)
    return 0


def _info(args: argparse.Namespace) -> int:
    from index.store import count_blank, read_manifest, resolve_version_dir

    version_dir = resolve_version_dir(args.directory)
    m = read_manifest(version_dir)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    build = m["build"]
    labels = f", {len(m['label_names'])} label names" if m.get("label_names") else ", unlabelled"
    params = ", ".join(f"{k}={v}" for k, v in m.get("search_params", {}).items()) or "none"
    rate = f", {build['images_per_second']} img/s" if build.get("images_per_second") else ""
    if build.get("pipeline_seconds"):  # counted over every run that made the build's pieces
        rate = f", {build['images_per_second']} img/s over {build['pipeline_seconds']} s of build"
    views = describe(m.get("views", DEFAULT_VIEWS))
    views = f", {views}" if views else ""
    blank = count_blank(version_dir)
    blank = "" if blank is None else f", {blank} blank (no content: one colour)"
    lines = [
        ("index", f"{version_dir} (version {m['version']})"),
        ("items", f"{m['count']}{labels}{blank}"),
        ("embedding", f"dim {m['embedding_dim']}, {m['granularity']}, {m['normalization']}-normalised, "
                      f"{m['metric']}{views}"),
        ("faiss", f"{m['index_factory']} ({m['index_type']}: {m['index_choice']}); search {params}"),
        ("model", f"{m['model_name']} in {m['model_dir']} (weights sha256 {m['weights_sha256'][:16]}…)"),
        ("sources", ", ".join(m["sources"])),
        ("last build", f"{build['mode']} from {build['source']}: {build['indexed']} indexed, {build['skipped']} "
                       f"skipped, {build['already_indexed']} already indexed; {build['seconds']} s{rate} on "
                       f"{build['device']}"),
        ("builds", str(len(m.get("history", [])))),
    ]
    if build.get("stage_seconds"):  # builds since the pipeline: where the time went, over every run of the build
        stages = ", ".join(f"{name} {seconds:.1f}" for name, seconds in build["stage_seconds"].items())
        resumed = f" (resumed after {build['resumed_items']} items)" if build.get("resumed_items") else ""
        decoder = ""
        if build.get("decode") == "gpu":
            decoder = (f"; JPEGs decoded on the device ({build.get('decoded_on_device', 0)}, "
                       f"{build.get('device_decode_fallbacks', 0)} rejected and decoded on the CPU), gpu_decode: "
                       "the decode thread's seconds")
        lines.insert(-1, ("stages", f"{stages} s; read, decode and preprocess summed over {build['workers']} "
                                    f"worker processes; {build['pipeline_seconds']} s in all{resumed}{decoder}"))
    for name, value in lines:
        print(f"{name:<11} {value}")
    _print_skipped(m.get("skipped", []))
    return 0


def _print_skipped(skipped: list[dict]) -> None:
    if not skipped:
        return
    print(f"skipped     {len(skipped)} files:")
    for entry in skipped[:MAX_SKIPPED_SHOWN]:
        print(f"  {entry['key']}: {entry['reason']}")
    if len(skipped) > MAX_SKIPPED_SHOWN:
        print(f"  … and {len(skipped) - MAX_SKIPPED_SHOWN} more (matsearch index info DIR --json lists them all)")
