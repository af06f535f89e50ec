"""`matsearch`: one command-line entry point; each subcommand lives beside the code it drives.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`; it is imported only when used,
so `matsearch --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    # name: (module, one-line help)
    "train": ("training.train", "train a nested MatMamba-Vision encoder (Fashion-MNIST or an ImageFolder)"),
    "index": ("app.index_cli", "build or extend a FAISS index of full-model embeddings"),
    "search": ("app.search_cli", "search an index with query images at any granularity"),
    "budget": ("evaluation.frontier", "measure the Pareto frontier of Mix'n'Match submodels (accuracy vs cost) for a model"),
    "eval": ("evaluation.evaluate", "retrieval accuracy of every granularity, Mix'n'Match, funnel and adaptive mode"),
    "bench": ("benchmarks.resolution", "encoder throughput, latency and memory vs resolution (and ViT); "
              "`bench train`: training speed; `bench index`: index-build vs encoder-only throughput"),
    "model": ("app.model_cli", "import the paper's released checkpoints as model folders; list the shipped models"),
    "app": ("app.launch", "start the Streamlit search UI"),
    "demo": ("app.demo", "the main job: index Fashion-MNIST with the shipped model, query it at every granularity"),
}

# subjects of a subcommand with options of their own: `matsearch bench train ...` runs benchmarks.train_speed
SUBJECTS = {("bench", "train"): ("benchmarks.train_speed", "training speed: fwd+bwd+AdamW img/s per level, the "
                                                           "joint nested step and a ViT of the same token count"),
            ("bench", "index"): ("benchmarks.index_build", "index-build throughput against encoder-only throughput, "
                                                           "per stage")}


def _subject(argv: list[str]) -> tuple[str, str] | None:
    words = [a for a in argv if not a.startswith("-")][:2]
    return tuple(words) if tuple(words) in SUBJECTS else None


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matsearch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == load:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    subject = _subject(argv)
    if subject is not None:
        module_name, help_text = SUBJECTS[subject]
        parser = argparse.ArgumentParser(prog="matsearch " + " ".join(subject), description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(parser)
        rest = list(argv)
        for word in subject:
            rest.remove(word)
        args = parser.parse_args(rest)
        args.command = " ".join(subject)
        return _run(module, args)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return _run(importlib.import_module(SUBCOMMANDS[args.command][0]), args)


def _run(module, args: argparse.Namespace) -> int:
    try:
        return int(module.run(args) or 0)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # user errors: one clear line, no traceback
        if getattr(args, "debug", False):
            raise
        print(f"matsearch {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
