"""`matsearch model import SRC --out DIR` (the paper's released checkpoints) and `matsearch model list`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DTYPES = {"keep": None, "fp32": "float32", "bf16": "bfloat16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="model_command", metavar="ACTION")
    parser.set_defaults(model_parser=parser)

    imp = actions.add_parser(
        "import", help="import an official MatMamba-Vision checkpoint as a model folder",
        description="Convert a checkpoint of the paper's code (ScaledFoundations/MatMamba: config.json + "
                    "pytorch_model.bin or model.safetensors) into a model folder of ours, with the preprocessing it "
                    "was evaluated with and a model card. The .bin is read as tensors only: no code runs.")
    imp.add_argument("source", metavar="SRC",
                     help="checkpoint folder, or hf:ORG/NAME (e.g. hf:scaledfoundations/MatMamba-Vision-135M-ImageNet)"
                          ", downloaded with huggingface_hub")
    imp.add_argument("--out", required=True, metavar="DIR", help="new model folder (must not exist or be empty)")
    imp.add_argument("--name", help="the model's name in its config (default: the checkpoint folder's name)")
    imp.add_argument("--dtype", choices=list(DTYPES), default="keep",
                     help="weights as stored (keep, default: the paper's are fp32), fp32 or bf16 (half the size)")
    imp.add_argument("--debug", action="store_true", help="show tracebacks on errors")

    lst = actions.add_parser("list", help="the shipped model folders and what each was trained on",
                             description="List the model folders shipped under vision_model/weights (and any DIRs "
                                         "given): name, parameters, input, granularities, training data.")
    lst.add_argument("dirs", nargs="*", metavar="DIR", help="more model folders to describe")
    lst.add_argument("--json", action="store_true", help="print the rows as JSON")
    lst.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def run(args: argparse.Namespace) -> int:
    action = {"import": _import, "list": _list}.get(args.model_command)
    if action is None:
        args.model_parser.print_help()
        return 2
    return action(args)


def _import(args: argparse.Namespace) -> int:
    import torch

    from vision_model.convert import import_checkpoint
    dtype = DTYPES[args.dtype]
    out = import_checkpoint(args.source, args.out, name=args.name,
                            dtype=None if dtype is None else getattr(torch, dtype))
    row = describe_model(out)
    print(f"imported {args.source} -> {out}: {row['name']}, {row['params_m']}M parameters, {row['input']}, "
          f"levels {', '.join(row['levels'])}; trained on {row['trained_on']}")
    print(f"next: matsearch index build FOLDER --model {out} --out INDEX")
    return 0


def describe_model(directory: Path, name: str | None = None) -> dict:
    """One row about a model folder: what `model list` prints (`name`: what it is loaded by, default its config's)."""
    from safetensors import safe_open

    from vision_model.hub import WEIGHTS_FILE, read_config
    config, meta = read_config(directory)
    with safe_open(str(Path(directory) / WEIGHTS_FILE), "pt") as f:
        params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    return {"dir": str(directory), "name": name or config.name, "params_m": round(params / 1e6, 1),
            "input": f"{config.img_size}px {'grey' if config.in_chans == 1 else 'RGB'}",
            "levels": ["D" if lv == 1 else f"D/{lv}" for lv in config.levels],
            "trained_on": config.describe_training(), "source": meta.get("source", "trained by this project")}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _list(args: argparse.Namespace) -> int:
    from vision_model.hub import DEFAULT_MODEL_DIR, WEIGHTS_FILE
    shipped = sorted(p for p in DEFAULT_MODEL_DIR.parent.iterdir() if (p / WEIGHTS_FILE).is_file())
    rows = []
    for directory in shipped + [Path(d) for d in args.dirs]:
        row = describe_model(directory, directory.name if directory in shipped else None)
        row["default"] = directory.resolve() == DEFAULT_MODEL_DIR.resolve()
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        mark = " (default)" if row["default"] else ""
        print(f"{row['name']}{mark}: {row['params_m']}M parameters, {row['input']}, levels {', '.join(row['levels'])}"
              f"\n  trained on: {row['trained_on']}\n  source: {row['source']}\n  folder: {row['dir']}")
    return 0
