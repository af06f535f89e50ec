"""`matsearch eval`: retrieval quality and cost of every way to query a full-model index.

Database: Fashion-MNIST train (60k, or the first --limit-db) embedded by the full model (level 1), from an index
folder (--index: reused, or built there) or encoded in memory. Queries: Fashion-MNIST test (10k, or the first
--limit-queries). Settings: each trained level, Mix'n'Match configs, the funnel (small shortlist, large rerank;
always, and gated), adaptive mode (gated), and control models (separately trained encoders queried against the
same database: another metric space, so they are expected to fail).

Gated settings (retrieval/gate.py) come with both gates: the score margin ("if margin<X") and the label vote
("if vote@10<T", when the database has labels), each calibrated on held-out *train* images for every target
escalation rate (--escalation-rates), never on the test queries. Settings that calibrate to the same threshold are
measured once. Metrics are defined in evaluation/metrics.py. Per setting:

    top1, map@10, map@100, recall@10 (of the full-model query's top 10), query_mflops (mean per query, cost
    model), latency_ms (mean per query at batch 1: encode + search (+ rerank), on a sample), latency_p50_ms (its
    median), batch_ms_per_query (per query when the whole query set is encoded in batches), escalation_rate,
    submodels, queries and database (sizes); gate ("margin", "vote" or None for ungated settings),
    gate_threshold, vote_k (vote gates) and target_escalation_rate (the rate the threshold was calibrated for)
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import vision_model
from vision_model.views import DEFAULT_VIEWS, VIEW_SETS, describe, views_of

from retrieval import knn
from . import folder_eval, metrics
from .datasets import encode_database, fashion_mnist, fashion_mnist_rows
from retrieval.encoder import QueryEncoder
from retrieval.cascade import Cascade, cascade_search
from retrieval.gate import DEFAULT_VOTE_K, GATES, Gate, calibrate_gate, held_out_statistic
from retrieval.staged import StagedResult, StageTimer, plain_search
from retrieval.submodel import Submodel, trained_levels

K_MAX = 100  # results kept per query: enough for mAP@100
CALIBRATION_QUERIES = 1000
ESCALATION_RATES = (0.05, 0.25, 0.5)


# -- settings ----------------------------------------------------------------------------------------------------------
def mix_n_match_examples(config) -> list[Submodel]:
    """A spread of Mix'n'Match configs built from the trained widths (at least six for four widths)."""
    widths = [config.d_model // level for level in config.levels]  # widest first
    full, half_w, small = widths[0], widths[min(1, len(widths) - 1)], widths[-1]
    quarter = widths[min(2, len(widths) - 1)]
    depth = config.depth
    h = depth // 2
    ramp_up = tuple(widths[::-1][i * len(widths) // depth] for i in range(depth))  # narrow early, wide late
    configs = [
        (full,) * h + (half_w,) * (depth - h),  # wide early layers
        (half_w,) * h + (full,) * (depth - h),  # wide late layers
        (full,) * h + (small,) * (depth - h),
        (small,) * h + (full,) * (depth - h),
        tuple(full if i % 2 == 0 else quarter for i in range(depth)),  # alternating
        ramp_up,
        ramp_up[::-1],
        (quarter,) * h + (half_w,) * (depth - h),
    ]
    uniform = {(w,) * depth for w in widths}
    return [Submodel(widths=w) for w in dict.fromkeys(configs) if w not in uniform]


@dataclass
class Setting:
    name: str
    kind: str  # level | mix'n'match | funnel | adaptive | control
    run: Callable[[knn.VectorDatabase, Callable, int, StageTimer], StagedResult]  # (db, embed, n, timer)
    gate: Gate | None = None  # funnel / adaptive: which queries pay for the large submodel (None: all or none)
    target_rate: float | None = None  # the escalation rate the gate was calibrated for

    def gate_record(self) -> dict:
        gate = self.gate
        threshold = gate.threshold if gate is not None and np.isfinite(gate.threshold) else None
        return {"gate": gate.kind if gate else None, "gate_threshold": threshold,
                "vote_k": gate.vote_k if gate is not None and gate.kind == "vote" else None,
                "target_escalation_rate": self.target_rate}


def _plain(sub: Submodel, config, kind: str) -> Setting:
    return Setting(sub.name, kind, lambda db, embed, n, timer: plain_search(db, embed, n, sub, K_MAX, config, timer))


def _cascade(cascade: Cascade, config, target_rate: float | None = None) -> Setting:
    return Setting(cascade.name, cascade.kind,
                   lambda db, embed, n, timer: cascade_search(db, embed, n, cascade, K_MAX, config, timer),
                   cascade.gate, target_rate)


def gated_settings(db: knn.VectorDatabase, small: Submodel, large: Submodel, config, calibration: np.ndarray,
                   own_ids: np.ndarray | None, escalation_rates: tuple[float, ...], shortlist: int,
                   vote_k: int = DEFAULT_VOTE_K, log: Callable[[str], None] = print) -> list[Setting]:
    """Funnel (shortlist `shortlist`) and adaptive settings small -> large for each gate and target escalation
    rate, thresholds calibrated on `calibration`: held-out query embeddings by `small` (`own_ids`: their own
    database rows, left out). The vote gate only where the database has labels. One setting per distinct name."""
    settings: dict[str, Setting] = {}
    for kind in GATES:
        if kind == "vote" and not knn.has_labels(db):
            log("note: the database has no labels: no vote-gated settings")
            continue
        statistic = held_out_statistic(kind, db, calibration, own_ids, vote_k)
        for rate in escalation_rates:
            gate = calibrate_gate(kind, statistic, rate, vote_k)
            held_out = float(gate.escalate_statistic(statistic).mean()) if len(statistic) else 0.0
            log(f"  {gate.label}: {held_out:.1%} of {len(statistic)} held-out queries escalate (target {rate:.0%})")
            for setting in (_cascade(Cascade.funnel(small, large, shortlist, gate), config, rate),
                            _cascade(Cascade.adaptive(small, large, gate), config, rate)):
                settings.setdefault(setting.name, setting)
    return list(settings.values())


# -- query embeddings, computed once per submodel and timed ---------------------------------------------------------
class EmbeddingCache:
    """Each submodel's embeddings of the whole query set, with the batched encode time per query."""

    def __init__(self, encoder: QueryEncoder, pixels: torch.Tensor):
        self.encoder, self.pixels = encoder, pixels
        self._embeddings: dict[Submodel, np.ndarray] = {}
        self.ms_per_query: dict[Submodel, float] = {}

    def __call__(self, submodel: Submodel, rows: np.ndarray) -> np.ndarray:
        if submodel not in self._embeddings:
            start = time.perf_counter()
            self._embeddings[submodel] = self.encoder.embed(self.pixels, submodel)
            self.ms_per_query[submodel] = (time.perf_counter() - start) * 1e3 / len(self.pixels)
        return self._embeddings[submodel][rows]


# -- the evaluation ------------------------------------------------------------------------------------------------
@dataclass
class Database:
    db: knn.VectorDatabase
    train_rows: np.ndarray  # the Fashion-MNIST train row of each database id
    description: str
    views: str  # the view set each database image was embedded with (vision_model.views)


def _open_or_build_index(index_dir: Path, model_dir: Path, limit_db: int | None, views: str | None, device: str,
                         log: Callable[[str], None]) -> Database:
    from index import IndexStore, build_index
    from index.store import current_version

    if current_version(index_dir) is None:
        log(f"building a Fashion-MNIST train index in {index_dir} (full model) ...")
        build_index("fashion-mnist:train", index_dir, model_dir=model_dir, limit=limit_db, device=device,
                    progress=False, views=views)
    store = IndexStore.open(index_dir, device=device)
    if views is not None and views != store.views:
        raise ValueError(f"the index {index_dir} holds embeddings of the view set {store.views!r}, not {views!r}: "
                         "give another --index folder, or leave --db-views out to evaluate it as it is")
    if limit_db is not None and limit_db != len(store):
        log(f"note: reusing {index_dir} as it is, with {len(store)} images (--limit-db {limit_db} applies to a new "
            "index only)")
    if store.weights_sha256 != vision_model.weights_hash(model_dir):
        raise ValueError(f"the index {index_dir} was built with {store.model_dir} (weights sha256 "
                         f"{store.weights_sha256[:16]}…), not the model evaluated, {model_dir} "
                         f"({vision_model.weights_hash(model_dir)[:16]}…): give another --index folder")
    rows = [row["key"] for row in store.metadata(np.arange(len(store)))]
    prefix = "fashion-mnist:train/"
    if not all(key.startswith(prefix) for key in rows):
        raise ValueError(f"the index {index_dir} holds images other than fashion-mnist:train: eval needs one built "
                         "from fashion-mnist:train")
    return Database(store, np.array([int(key[len(prefix):]) for key in rows]), f"index {store.directory}",
                    store.views)


def _encode_in_memory(encoder: QueryEncoder, limit_db: int | None, views: str | None,
                      log: Callable[[str], None]) -> Database:
    n = len(fashion_mnist("train")[1]) if limit_db is None else limit_db
    views = views or DEFAULT_VIEWS
    log(f"encoding {n} Fashion-MNIST train images with the full model ({len(views_of(views))} view(s): {views}) ...")
    pixels, labels = fashion_mnist_rows(encoder.model, "train", slice(0, n))
    return Database(encode_database(encoder, pixels, labels, views), np.arange(len(labels)),
                    "in memory (faiss flat)", views)


def _calibration_queries(model, database: Database) -> tuple[torch.Tensor, np.ndarray]:
    """Held-out train images for margin calibration, and the database id each one has (-1: not indexed)."""
    n_train = len(fashion_mnist("train")[1])
    indexed = np.full(n_train, -1)
    indexed[database.train_rows] = np.arange(len(database.train_rows))
    unseen = np.flatnonzero(indexed < 0)
    # unseen train images if there are enough, else indexed ones, with their own match left out
    rows = unseen[:CALIBRATION_QUERIES] if len(unseen) >= CALIBRATION_QUERIES else np.arange(CALIBRATION_QUERIES)
    pixels, _ = fashion_mnist_rows(model, "train", rows)
    return pixels, indexed[rows]


def _measure(setting: Setting, database: Database, cache: EmbeddingCache, query_labels: np.ndarray,
             n_relevant: np.ndarray, reference_ids: np.ndarray | None, encoder: QueryEncoder,
             latency_queries: int) -> tuple[dict, np.ndarray]:
    n = len(query_labels)
    timer = StageTimer()
    staged = setting.run(database.db, cache, n, timer)
    result_labels = knn.labels_of(database.db, staged.ids)
    # batched cost per query: each submodel's encode for the queries that used it, plus search and rerank
    encode_ms = sum(cache.ms_per_query[s] * (1.0 if i == 0 else staged.escalation_rate)
                    for i, s in enumerate(staged.submodels))
    totals = timer.totals()
    batch_ms = encode_ms + (totals["search"] + totals["rerank"]) / n

    def one_query(row: int) -> None:  # the real pipeline at batch 1: encode on demand
        pixels = cache.pixels[row:row + 1]
        setting.run(database.db, lambda sub, rows: encoder.embed(pixels[rows], sub), 1, StageTimer())

    latencies = metrics.latencies_ms(one_query, range(min(latency_queries, n)))
    record = {
        "setting": setting.name,
        "kind": setting.kind,
        "top1": metrics.top1_accuracy(result_labels, query_labels),
        "map@10": metrics.map_at_k(result_labels, query_labels, 10, n_relevant),
        "map@100": metrics.map_at_k(result_labels, query_labels, 100, n_relevant),
        "recall@10": metrics.recall_at_k(staged.ids, reference_ids if reference_ids is not None else staged.ids, 10),
        "query_mflops": float(staged.mflops.mean()),
        "latency_ms": float(latencies.mean()),
        "latency_p50_ms": float(np.median(latencies)),
        "batch_ms_per_query": batch_ms,
        "escalation_rate": staged.escalation_rate,
        "submodels": [s.name for s in staged.submodels],
        "queries": n,
        "query_source": "fashion-mnist:test",
        "database": len(database.db),
        "database_source": "fashion-mnist:train",  # what the page compares with an index's sources
        "database_views": database.views,
        **setting.gate_record(),
    }
    return record, staged.ids


def evaluate(model_dir: str | Path | None = None, index_dir: str | Path | None = None, limit_db: int | None = None,
             limit_queries: int | None = None, control_models: list[str | Path] = (),
             escalation_rates: tuple[float, ...] = ESCALATION_RATES, shortlist: int = 100, latency_queries: int = 50,
             batch_size: int = 256, device: str = "cpu", db_views: str | None = None,
             log: Callable[[str], None] = print) -> list[dict]:
    """Every setting's record (see the module docstring), the full model first. db_views: the view set of the
    database embeddings (vision_model.views; default "1", or the --index folder's own)."""
    model_dir = Path(model_dir) if model_dir is not None else vision_model.DEFAULT_MODEL_DIR
    model = vision_model.load_model(model_dir, device=device)
    config = model.config
    # the controls load now, so a wrong folder fails in a second rather than after the whole evaluation
    controls = [(Path(d), vision_model.load_model(d, device=device)) for d in control_models]
    for control_dir, control in controls:
        if control.config.d_model != config.d_model:
            raise ValueError(f"control model {control_dir} embeds into {control.config.d_model} dimensions, the "
                             f"database into {config.d_model}: it cannot even be searched with")
    encoder = QueryEncoder(model, batch_size=batch_size)
    database = _open_or_build_index(Path(index_dir), model_dir, limit_db, db_views, device, log) \
        if index_dir is not None else _encode_in_memory(encoder, limit_db, db_views, log)
    n_test = len(fashion_mnist("test")[1])
    query_pixels, query_labels = fashion_mnist_rows(model, "test", slice(0, limit_queries or n_test))
    n_relevant = metrics.relevant_counts(database.db.labels, query_labels)
    log(f"database: {len(database.db)} train images ({database.description}); queries: {len(query_labels)} test "
        "images")

    levels = trained_levels(config)
    full, small = levels[0], levels[-1]
    settings = [_plain(s, config, "level") for s in levels]
    settings += [_plain(s, config, "mix'n'match") for s in mix_n_match_examples(config)]

    # margin and vote thresholds from held-out train queries, for each target escalation rate
    settings.append(_cascade(Cascade.funnel(small, full, shortlist), config))
    cal_pixels, cal_own_ids = _calibration_queries(model, database)
    log(f"calibrating the gates of {small.name} -> {full.name} on {len(cal_own_ids)} held-out train images:")
    settings += gated_settings(database.db, small, full, config, encoder.embed(cal_pixels, small), cal_own_ids,
                               escalation_rates, shortlist, log=log)

    cache = EmbeddingCache(encoder, query_pixels)
    records, reference_ids = [], None
    for setting in settings:
        record, ids = _measure(setting, database, cache, query_labels, n_relevant, reference_ids, encoder,
                               latency_queries)
        if reference_ids is None:  # the full model comes first: its neighbours are the reference
            reference_ids = ids[:, :10]
        records.append(record)
        log(_progress_line(record))
    for control_dir, control in controls:
        record = _control(control_dir, control, database, query_labels, n_relevant, reference_ids, batch_size,
                          latency_queries)
        records.append(record)
        log(_progress_line(record))
    return records


def _control(control_dir: Path, model, database: Database, query_labels: np.ndarray, n_relevant: np.ndarray,
             reference_ids: np.ndarray, batch_size: int, latency_queries: int) -> dict:
    """A separately trained encoder (its full width) as the query encoder against the full model's database."""
    encoder = QueryEncoder(model, batch_size=batch_size)
    pixels, _ = fashion_mnist_rows(model, "test", slice(0, len(query_labels)))
    setting = _plain(Submodel(level=1), model.config, "control")
    # train runs save to <run>/model, so the run folder is what tells controls apart
    setting.name = (f"control: separately trained {model.config.name}, d_inner {model.config.inner_dim} "
                    f"({'/'.join(control_dir.resolve().parts[-2:])})")
    record, _ = _measure(setting, database, EmbeddingCache(encoder, pixels), query_labels, n_relevant, reference_ids,
                         encoder, latency_queries)
    record["submodels"] = [str(control_dir)]
    return record


def _progress_line(r: dict) -> str:
    return (f"  {r['setting']:<44} top-1 {r['top1']:.4f}  mAP@10 {r['map@10']:.4f}  R@10 {r['recall@10']:.3f}  "
            f"{r['query_mflops']:7.1f} MFLOPs  {r['latency_ms']:6.2f} ms")


# -- reports -------------------------------------------------------------------------------------------------------
def markdown_table(records: list[dict], title: str = "") -> str:
    header = ("| setting | kind | top-1 | mAP@10 | mAP@100 | recall@10 vs D | query MFLOPs | latency b=1 (ms) | "
              "ms/query batched | escalated |")
    lines = ([title, ""] if title else []) + [header, "|" + "---|" * 10]
    for r in records:
        lines.append(f"| {r['setting']} | {r['kind']} | {r['top1']:.4f} | {r['map@10']:.4f} | {r['map@100']:.4f} | "
                     f"{r['recall@10']:.3f} | {r['query_mflops']:.1f} | {r['latency_ms']:.2f} | "
                     f"{r['batch_ms_per_query']:.2f} | {_escalated(r)} |")
    return "\n".join(lines) + "\n"


def _escalated(r: dict) -> str:
    target = r.get("target_escalation_rate")
    return f"{r['escalation_rate']:.1%}" + (f" (target {target:.0%})" if target is not None else "")


KIND_STYLE = {"level": ("o", "tab:blue"), "mix'n'match": ("s", "tab:orange"), "funnel": ("^", "tab:green"),
              "adaptive": ("D", "tab:purple"), "control": ("x", "tab:red")}


def plot(records: list[dict], path: str | Path, title: str = "") -> None:
    """Top-1 accuracy against query MFLOPs, one labelled point per setting; the trained levels joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6.5))
    levels = sorted((r for r in records if r["kind"] == "level"), key=lambda r: r["query_mflops"])
    ax.plot([r["query_mflops"] for r in levels], [100 * r["top1"] for r in levels], color="tab:blue", alpha=0.4)
    for kind, (marker, color) in KIND_STYLE.items():
        for gate in (None,) + GATES:  # gated settings: filled for the vote, hollow for the margin
            points = [r for r in records if r["kind"] == kind and r.get("gate") == gate]
            if points:
                style = {"facecolors": "none", "edgecolors": color} if gate == "margin" else {"color": color}
                ax.scatter([r["query_mflops"] for r in points], [100 * r["top1"] for r in points], marker=marker,
                           label=f"{kind}, {gate} gate" if gate else kind, zorder=3, **style)
    for r in records:
        ax.annotate(r["setting"], (r["query_mflops"], 100 * r["top1"]), textcoords="offset points", xytext=(4, 3),
                    fontsize=6.5)
    ax.set_xlabel("query encoder MFLOPs per image")
    ax.set_ylabel("1-NN top-1 accuracy (%)")
    ax.set_title(title or "Querying a full-model index with nested submodels", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# -- command line --------------------------------------------------------------------------------------------------
def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates like 0.05,0.25, got {text!r}") from None
    if not all(0 <= rate <= 1 for rate in rates):
        raise argparse.ArgumentTypeError(f"escalation rates are fractions in [0, 1], got {text!r}")
    return rates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, metavar="OUT", help="write the records here (JSON list)")
    parser.add_argument("--model", metavar="DIR", help="saved model folder (default: the shipped model)")
    parser.add_argument("--index", metavar="DIR", help="Fashion-MNIST train index to reuse (built there if "
                                                       "missing); default: encode the database in memory")
    parser.add_argument("--limit-db", type=int, metavar="N", help="first N train images as the database")
    parser.add_argument("--limit-queries", type=int, metavar="N", help="first N test images as queries")
    parser.add_argument("--markdown", metavar="OUT.md", help="also write a markdown table")
    parser.add_argument("--plot", metavar="OUT.png", help="also plot top-1 against query MFLOPs")
    parser.add_argument("--control-model", action="append", default=[], metavar="DIR",
                        help="separately trained model used as query encoder (repeatable)")
    parser.add_argument("--escalation-rates", type=_rates, default=ESCALATION_RATES, metavar="R1,R2",
                        help="target rerank/escalation rates for the gated funnel and adaptive settings, each "
                             "calibrated for the margin and the vote gate (default "
                             f"{','.join(map(str, ESCALATION_RATES))})")
    parser.add_argument("--shortlist", type=int, default=100, help="funnel shortlist size (default 100)")
    parser.add_argument("--latency-queries", type=int, default=50, help="queries timed one by one per setting")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--db-views", choices=list(VIEW_SETS), metavar="SET",
                        help="embed each database image as the average of these views (vision_model.views: 1, flip, "
                             "shift1, shift2; default 1, or the --index folder's own)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    folder_eval.add_arguments(parser)  # --folder DIR: topic retrieval and copy detection on a folder of images


def run(args: argparse.Namespace) -> int:
    if args.folder:
        return folder_eval.run(args)
    started = time.perf_counter()
    records = evaluate(args.model, args.index, args.limit_db, args.limit_queries, args.control_model,
                       args.escalation_rates, args.shortlist, args.latency_queries, args.batch_size, args.device,
                       args.db_views)
    Path(args.json).write_text(json.dumps(records, indent=2))
    outputs = [args.json]
    model_name = Path(args.model or vision_model.DEFAULT_MODEL_DIR).name
    views = records[0]["database_views"]
    title = (f"{model_name}: {records[0]['queries']} Fashion-MNIST test queries against a full-model index of "
             f"{records[0]['database']} train images"
             + (f", each {describe(views)}" if describe(views) else ""))
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(records, f"**{title}**"))
        outputs.append(args.markdown)
    if args.plot:
        plot(records, args.plot, title)
        outputs.append(args.plot)
    print(f"wrote {', '.join(map(str, outputs))} ({time.perf_counter() - started:.0f} s)")
    return 0
