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
                                       "`bench index`: index-build vs encoder-only throughput"),
    "bench index": ("benchmarks.index_build", "index-build throughput against encoder-only throughput, per stage"),
    "app": ("app.launch", "start the Streamlit search UI"),
    "demo": ("app.demo", "the main job: index Fashion-MNIST with the shipped model, query it at every granularity"),
}



def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matsearch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if " " in name:  # a two-word command ("bench index") has a parser of its own: see main
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == load:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    words = [a for a in argv if not a.startswith("-")][:2]
    if " ".join(words) in SUBCOMMANDS and argv[:2] == words:  # e.g. `matsearch bench index ...`
        command = " ".join(words)
        parser = argparse.ArgumentParser(prog=f"matsearch {command}", description=SUBCOMMANDS[command][1])
        importlib.import_module(SUBCOMMANDS[command][0]).add_arguments(parser)
        args = parser.parse_args(argv[2:])
        args.command = command
    else:
        command = words[0] if words else None
        parser = build_parser(command if command in SUBCOMMANDS else None)
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # user errors: one clear line, no traceback
        if getattr(args, "debug", False):
            raise
        print(f"matsearch {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
