"""Benchmark outputs: bench.json, bench.md and PNG plots; plus the accuracy-vs-cost plot from a retrieval eval."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")  # files only; no display on a GPU box or in CI
import matplotlib.pyplot as plt  # noqa: E402

from vision_model.fileio import atomic_write  # noqa: E402

ROW_KEYS = ("model", "setting", "level", "widths", "resolution", "batch", "mode", "status", "images_per_s",
            "latency_ms", "peak_mem_gib", "gflops_per_image", "achieved_tflops")

COLUMNS_HELP = """\
- **mode**: `throughput` rows run the largest power-of-two batch that fit (up to the batch cap); `latency` rows
  run batch 1 (`+graph`: the call replayed as one CUDA graph, `--cuda-graphs`).
- **images/s**: batch / median seconds per call.  **latency ms**: median milliseconds per call (per batch).
- **peak GiB**: `torch.cuda.max_memory_allocated` over the timed calls (weights included; for `+graph` rows, over the
  capture too, where the graph's activations are allocated); CPU runs leave it empty.
- **GFLOPs/img**: analytic FLOPs (2 x MACs) per image, encoder only (no classifier head).
- **TFLOP/s**: GFLOPs/img x images/s / 1000: the arithmetic rate the encoder actually achieved.  **% of matmul**
  (GPU): that rate over `matmul_tflops`, an 8192^3 GEMM in the same dtype timed in the same run.
- **status**: `ok`, `oom` (even batch 1 ran out of memory), or `skipped` (with the reason in `note`)."""


# -- JSON ---------------------------------------------------------------------------------------------------------


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    atomic_write(path, json.dumps({"meta": meta, "rows": rows}, indent=1).encode())


def read_json(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(Path(path).read_text())
    return data["meta"], data["rows"]


# -- markdown -----------------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = ["# Encoder benchmark", ""]
    for key, value in meta.items():
        if key == "merged_from":
            value = ", ".join(run.get("dir", "?") for run in value)
        elif isinstance(value, list):
            value = " ".join(str(v) for v in value)
        lines.append(f"- {key}: {value}")
    lines += ["", COLUMNS_HELP, "", throughput_pivot(rows), "", "## All rows", ""]
    matmul = meta.get("matmul_tflops")  # measured in the same run (GPU): the yardstick for achieved TFLOP/s
    header = ["model", "setting", "res", "batch", "mode", "images/s", "latency ms", "peak GiB", "GFLOPs/img",
              "TFLOP/s", *(["% of matmul"] if matmul else []), "status", "note"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        mode = r["mode"] + ("+graph" if r.get("cuda_graph") else "")
        share = [] if not matmul else [_fmt(r["achieved_tflops"] and 100 * r["achieved_tflops"] / matmul)]
        cells = [r["model"], r["setting"], r["resolution"], r["batch"], mode, _fmt(r["images_per_s"], 4),
                 _fmt(r["latency_ms"]), _fmt(r["peak_mem_gib"]), _fmt(r["gflops_per_image"]),
                 _fmt(r["achieved_tflops"]), *share, r["status"], r.get("note") or ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def throughput_pivot(rows: list[dict]) -> str:
    """images/s per model/setting (rows) and resolution (columns): the table to read first."""
    series = _series(rows, "throughput", "images_per_s")
    resolutions = sorted({r["resolution"] for r in rows})
    lines = ["## Throughput (images/s)", "", "| model / setting | " + " | ".join(f"{r} px" for r in resolutions) + " |",
             "|---|" + "---|" * len(resolutions)]
    for name, points in series.items():
        by_res = dict(points)
        lines.append(f"| {name} | " + " | ".join(_fmt(by_res.get(res), 4) for res in resolutions) + " |")
    return "\n".join(lines)


# -- plots --------------------------------------------------------------------------------------------------------


def series_name(row: dict) -> str:
    return row["model"] if row["setting"] == "full" else f"{row['model']} {row['setting']}"


def _series(rows: Iterable[dict], mode: str, key: str) -> dict[str, list[tuple[int, float]]]:
    """{model/setting: [(resolution, value), ...]} over the ok rows of one mode, in first-seen order."""
    out: dict[str, list] = defaultdict(list)
    for r in rows:
        if r["mode"] == mode and r["status"] == "ok" and r.get(key) is not None:
            out[series_name(r)].append((r["resolution"], r[key]))
    return {k: sorted(v) for k, v in out.items()}


def _line_plot(series: dict, path: Path, ylabel: str, title: str) -> bool:
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(9, 6))
    for name, points in series.items():
        xs, ys = zip(*points)
        style = "--" if "vit" in name.lower() else "-"  # baselines dashed
        ax.plot(xs, ys, style, marker="o", markersize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    resolutions = sorted({x for pts in series.values() for x, _ in pts})
    ax.set_xticks(resolutions, [str(r) for r in resolutions])
    ax.set_xlabel("resolution (px, square)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_throughput_vs_resolution(rows: list[dict], path: Path, device: str = "") -> bool:
    return _line_plot(_series(rows, "throughput", "images_per_s"), path, "images/s",
                      f"Encoder throughput vs resolution {device}".strip())


def plot_memory_vs_resolution(rows: list[dict], path: Path, device: str = "") -> bool:
    """Batch-1 peak memory, so every resolution compares one image (throughput batches differ per resolution)."""
    return _line_plot(_series(rows, "latency", "peak_mem_gib"), path, "peak memory, batch 1 (GiB)",
                      f"Peak memory vs resolution {device}".strip())


def plot_throughput_vs_setting(rows: list[dict], path: Path, resolutions: list[int] | None = None) -> bool:
    """One panel per fixed resolution: images/s of every model/setting as horizontal bars."""
    series = _series(rows, "throughput", "images_per_s")
    measured = sorted({res for pts in series.values() for res, _ in pts})
    if not measured:
        return False
    if resolutions is None:  # smallest, middle and largest measured
        resolutions = sorted({measured[0], measured[len(measured) // 2], measured[-1]})
    resolutions = [r for r in resolutions if r in measured]
    fig, axes = plt.subplots(1, len(resolutions), figsize=(5 * len(resolutions), 0.35 * len(series) + 1.5),
                             squeeze=False)
    for ax, res in zip(axes[0], resolutions):
        names = [n for n, pts in series.items() if res in dict(pts)]
        values = [dict(series[n])[res] for n in names]
        colors = ["tab:gray" if "vit" in n.lower() else "tab:blue" for n in names]
        ax.barh(range(len(names)), values, color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("images/s")
        ax.set_title(f"{res} px")
        ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -- accuracy vs cost ---------------------------------------------------------------------------------------------


def load_eval_records(path: Path) -> list[dict]:
    """Records with `setting`, `top1` and `query_mflops` from a retrieval eval JSON: a list of records, or an
    object holding one under "records", "results" or "rows". Records missing a field are dropped."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = next((data[k] for k in ("records", "results", "rows") if isinstance(data.get(k), list)), [])
    needed = ("setting", "top1", "query_mflops")
    return [r for r in data if isinstance(r, dict) and all(r.get(k) is not None for k in needed)]


def plot_accuracy_vs_cost(records: list[dict], rows: list[dict], path: Path, model: str | None = None,
                          resolution: int | None = None) -> bool:
    """Left: top-1 vs query MFLOPs (from the eval). Right: top-1 vs measured images/s of the same setting label,
    read from the benchmark rows of one MatMamba model at one resolution (default: the first model measured, at
    its smallest resolution), when the labels match."""
    if not records:
        return False
    speed = throughput_by_setting(rows, model, resolution)
    matched = [r for r in records if r["setting"] in speed]
    panels = 2 if matched else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5), squeeze=False)
    _scatter_labelled(axes[0][0], [(r["query_mflops"], r["top1"], r["setting"]) for r in records])
    axes[0][0].set_xlabel("query MFLOPs")
    axes[0][0].set_xscale("log")
    axes[0][0].set_title("accuracy vs analytic cost")
    if matched:
        ax = axes[0][1]
        _scatter_labelled(ax, [(speed[r["setting"]][0], r["top1"], r["setting"]) for r in matched])
        ax.set_xlabel(f"images/s ({speed[matched[0]['setting']][1]})")
        ax.set_title("accuracy vs measured throughput")
    for ax in axes[0]:
        ax.set_ylabel("top-1")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def throughput_by_setting(rows: list[dict], model: str | None, resolution: int | None) -> dict[str, tuple]:
    ok = [r for r in rows if r["mode"] == "throughput" and r["status"] == "ok" and r["setting"] != "full"]
    if model is None and ok:
        model = ok[0]["model"]
    ok = [r for r in ok if r["model"] == model]
    if resolution is None and ok:
        resolution = min(r["resolution"] for r in ok)
    speed = {}
    for r in (r for r in ok if r["resolution"] == resolution):
        value = (r["images_per_s"], f"{model}, {resolution} px")
        speed[r["setting"]] = value
        if r.get("widths"):  # the retrieval eval names Mix'n'Match settings by their widths: "mnm:192,96,..."
            speed["mnm:" + ",".join(str(w) for w in r["widths"])] = value
    return speed


def _scatter_labelled(ax, points: list[tuple[float, float, str]]) -> None:
    for x, y, label in points:
        ax.scatter([x], [y], s=18)
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")


# -- everything at once -------------------------------------------------------------------------------------------


def write_reports(out: Path, meta: dict, rows: list[dict], eval_json: Path | None = None,
                  eval_model: str | None = None, eval_resolution: int | None = None) -> list[Path]:
    """bench.json, bench.md and every plot the rows can support; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", meta, rows)
    (out / "bench.md").write_text(markdown(meta, rows))
    written = [out / "bench.json", out / "bench.md"]
    device = f"({meta['device']})" if isinstance(meta.get("device"), str) else ""
    plots = {
        "throughput_vs_resolution.png": lambda p: plot_throughput_vs_resolution(rows, p, device),
        "memory_vs_resolution.png": lambda p: plot_memory_vs_resolution(rows, p, device),
        "throughput_vs_level.png": lambda p: plot_throughput_vs_setting(rows, p),
    }
    if eval_json is not None:
        plots["accuracy_vs_cost.png"] = lambda p: plot_accuracy_vs_cost(load_eval_records(eval_json), rows, p,
                                                                         eval_model, eval_resolution)
    for name, plot in plots.items():
        if plot(out / name):
            written.append(out / name)
    return written


def achieved_tflops(gflops_per_image: float | None, images_per_s: float | None) -> float | None:
    if gflops_per_image is None or images_per_s is None or not math.isfinite(images_per_s):
        return None
    return gflops_per_image * images_per_s / 1e3
