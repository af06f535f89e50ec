"""`matsearch search --index DIR IMAGE...`: nearest neighbours of query images at any granularity.

    matsearch search --index indexes/fashion-mnist-train shoe.png --level 4
    matsearch search --index DIR a.png b.jpg --widths 192,192,96,96,48,48,24,24 --k 5 --json
    matsearch search --index DIR a.png --budget-mflops 80          # needs the model's pareto.json
    matsearch search --index DIR a.png --funnel D/8:D:100                    # rerank every query
    matsearch search --index DIR a.png --funnel D/8:D:100 --rerank-vote 0.8  # rerank if < 80% of the top 10
                                                                             #   share the top-1's label
    matsearch search --index DIR a.png --funnel D/8:D:100 --rerank-margin 0.02   # rerank if top-1/top-2 < 0.02
    matsearch search --index DIR a.png --adaptive D/8:D:vote0.8 [--vote-k 20]    # escalate by the label vote
    matsearch search --index DIR a.png --adaptive D/8:D:0.02                     # escalate by the score margin

The label vote needs an index with labels (built from fashion-mnist:... or imagefolder:DIR); on an unlabelled
index use the score margin. How the gates compare, with thresholds calibrated on held-out queries: `matsearch eval`.
"""
from __future__ import annotations

import argparse
import json
import sys

MODE_FLAGS = "--level, --widths, --budget-mflops, --budget-ms, --funnel, --adaptive"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="query image files")
    parser.add_argument("--index", required=True, metavar="DIR", help="index folder (matsearch index build)")
    parser.add_argument("--model", metavar="DIR", help="model folder (default: the one the index was built with; "
                                                       "another model is refused)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--level", type=int, choices=(1, 2, 4, 8), help="trained granularity: width d_model/LEVEL")
    mode.add_argument("--widths", metavar="W1,W2,...", help="Mix'n'Match: one width per layer")
    mode.add_argument("--budget-mflops", type=float, metavar="X", help="the most accurate submodel within X MFLOPs")
    mode.add_argument("--budget-ms", type=float, metavar="X", help="the most accurate submodel within X ms a query")
    mode.add_argument("--funnel", metavar="SMALL:LARGE:SHORTLIST",
                      help="shortlist with SMALL, rerank with LARGE, e.g. D/8:D:100 or 8:1:100")
    mode.add_argument("--adaptive", metavar="SMALL:LARGE:GATE",
                      help="SMALL first; escalate to LARGE the queries the gate calls uncertain. GATE voteT: fewer "
                           "than a fraction T of SMALL's top --vote-k results share the top-1 result's label, e.g. "
                           "D/8:D:vote0.6 (needs labels); GATE X or marginX: the top-1/top-2 score margin is below "
                           "X, e.g. D/8:D:0.02")
    rerank = parser.add_mutually_exclusive_group()
    rerank.add_argument("--rerank-margin", type=float, metavar="X",
                        help="with --funnel: rerank only queries whose shortlist top-1/top-2 margin is below X")
    rerank.add_argument("--rerank-vote", type=float, metavar="T",
                        help="with --funnel: rerank only queries where fewer than a fraction T (0 < T <= 1) of the "
                             "shortlist's top --vote-k results share the top-1 result's label (needs labels)")
    parser.add_argument("--vote-k", type=int, metavar="K",
                        help="with a vote gate (--rerank-vote, --adaptive SMALL:LARGE:voteT): how many top results "
                             "vote (default 10)")
    parser.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    parser.add_argument("--label", action="append", metavar="LABEL", help="only results with this label (repeatable)")
    parser.add_argument("--min-score", type=float, metavar="S", help="drop results scoring below S")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")


# Up to this many query images on the CPU are encoded with one thread: a batch this small gains nothing from
# more, and on a busy machine the extra threads' spin-waiting cost many times the work (docs/notes).
SINGLE_THREAD_QUERIES = 8


def run(args: argparse.Namespace) -> int:
    import torch

    from retrieval.encoder import UnreadableQuery, load_query_image
    from retrieval.search import Searcher
    from retrieval.submodel import Submodel
    from vision_model.preprocess import decode_size

    cascade = _cascade(args)
    gate = cascade.gate if cascade is not None else None
    submodel = Submodel.parse(args.widths) if args.widths else Submodel(level=args.level or 1)

    if args.device == "cpu" and len(args.images) <= SINGLE_THREAD_QUERIES:
        torch.set_num_threads(1)
    searcher = Searcher(args.index, args.model, device=args.device)
    if gate is not None:
        try:
            gate.check(searcher.store)  # a vote gate on an unlabelled index: say so before reading any image
        except ValueError:
            searcher.close()
            raise
    if args.budget_mflops is not None or args.budget_ms is not None:
        submodel = searcher.submodel_for_budget(args.budget_mflops, args.budget_ms)
    submodel.resolve(searcher.config)  # a bad --widths fails here, before any image is read

    images, names, errors = [], [], []
    size = decode_size(searcher.config)  # decoded (reduced) as an index build decodes: the pixels the index saw
    for path in args.images:  # one bad file must not cost the others their answer
        try:
            images.append(load_query_image(path, target_size=size))
            names.append(path)
        except UnreadableQuery as e:
            errors.append({"query": path, "error": str(e)})
            print(f"matsearch search: error: {e}", file=sys.stderr)
    results = searcher.search(images, submodel, args.k, cascade=cascade, label_filter=args.label,
                              score_threshold=args.min_score) if images else []

    mode = cascade.name if cascade is not None else submodel.name
    if args.json:
        print(json.dumps({"index": str(searcher.store.directory), "model": str(searcher.model_dir), "mode": mode,
                          "results": [{"query": name, **r.to_dict()} for name, r in zip(names, results)],
                          "errors": errors}, indent=2))
    else:
        for name, result in zip(names, results):
            print(_table(name, mode, result))
    searcher.close()
    return 1 if errors else 0


def _cascade(args: argparse.Namespace):
    """The funnel or adaptive Cascade from --funnel/--adaptive and the gate flags, or None; ValueError on a bad
    mix."""
    from retrieval.cascade import Cascade
    from retrieval.gate import DEFAULT_VOTE_K

    for flag, value in (("--rerank-margin", args.rerank_margin), ("--rerank-vote", args.rerank_vote)):
        if value is not None and args.funnel is None:
            hint = " (for --adaptive, put the gate in its spec: SMALL:LARGE:X or SMALL:LARGE:voteT)" \
                if args.adaptive else ""
            raise ValueError(f"{flag} goes with --funnel{hint}")
    vote_k = DEFAULT_VOTE_K if args.vote_k is None else args.vote_k
    cascade = (Cascade.parse_funnel(args.funnel, args.rerank_margin, args.rerank_vote, vote_k) if args.funnel
               else Cascade.parse_adaptive(args.adaptive, vote_k) if args.adaptive else None)
    if args.vote_k is not None and (cascade is None or cascade.gate is None or cascade.gate.kind != "vote"):
        raise ValueError("--vote-k goes with a vote gate: --funnel ... --rerank-vote T or --adaptive "
                         "SMALL:LARGE:voteT")
    return cascade


def _table(name: str, mode: str, result) -> str:
    t = result.timings
    used = " -> ".join(result.submodels)
    head = (f"{_printable(name)}  [{mode}; used {used}]  {result.mflops:.1f} MFLOPs  decode {t['decode']:.1f} ms, "
            f"encode {t['encode']:.1f} ms, search {t['search']:.2f} ms, rerank {t['rerank']:.2f} ms")
    lines = [head, f"  {'rank':>4}  {'id':>7}  {'score':>7}  {'label':<14}  {'note':<5}  key"]
    for rank, (id_, score, row) in enumerate(zip(result.ids, result.scores, result.metadata), start=1):
        label = _printable(row["label_name"]) if row["label_name"] is not None else "-"
        note = "blank" if row.get("blank") else "-"  # the item shows no content: one colour
        lines.append(f"  {rank:>4}  {id_:>7}  {score:7.4f}  {label:<14}  {note:<5}  {_printable(row['key'])}")
    if not len(result.ids):
        lines.append("  (no results)")
    return "\n".join(lines) + "\n"


def _printable(text: str) -> str:
    """One table cell on one line: control characters (a newline in a file name, say) shown as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
