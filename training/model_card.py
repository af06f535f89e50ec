"""Model card for a trained MatMamba-Vision folder: per-granularity test accuracy, the Mix'n'Match curve
(accuracy vs FLOPs between the trained widths) and, optionally, independently trained models of the same sizes.

    python -m training.model_card vision_model/weights/matmamba_vision_fmnist \
        --independent runs/independent_d2/model runs/independent_d4/model runs/independent_d8/model

Writes MODEL_CARD.md, mixnmatch.png and eval.json into the model folder (classification top-1 on the
Fashion-MNIST test set, fp32 on whatever device runs it).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from vision_model.cost import submodel_cost
from vision_model.datasets import load_fashion_mnist
from vision_model.fileio import atomic_write
from vision_model.hub import from_pretrained, read_config, weights_hash
from .train import TrainConfig, evaluate


def mix_n_match_configs(depth: int, trained: list[int]) -> list[list[int]]:
    """Per-layer width configs between each pair of neighbouring trained widths (wide, narrow):
    the first k layers wide (k = depth/4, depth/2, 3*depth/4), the last depth/2 layers wide, and alternating."""
    configs = []
    for wide, narrow in zip(trained, trained[1:]):
        for k in sorted({depth // 4, depth // 2, 3 * depth // 4}):
            configs.append([wide] * k + [narrow] * (depth - k))
        configs.append([narrow] * (depth - depth // 2) + [wide] * (depth // 2))
        configs.append([wide if i % 2 == 0 else narrow for i in range(depth)])
    return configs


def interpolate_line(points: list[tuple[float, float]], x: float) -> float:
    """Accuracy on the straight line between the two trained points that bracket x FLOPs."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise ValueError(f"{x} outside the trained range")


def config_differences(independent, nested) -> dict:
    """Config fields (other than the inner size that defines it) where an independent model differs from the nested
    one: {field: [independent value, nested value]}, so the card never calls a different recipe the same."""
    a, b = independent.to_dict(), nested.to_dict()
    return {k: [a[k], b[k]] for k in a if k not in ("d_inner", "name") and a[k] != b.get(k)}


def _teacher_text(meta: dict) -> str:
    teacher = meta.get("result", {}).get("teacher")
    return f"ResNet teacher ({teacher['test_top1']:.2f}%)" if teacher else "none"


def recipe_differences(independent_meta: dict, nested_meta: dict) -> dict:
    """Training settings (besides the levels that define a nested run) where the two runs differ, the distillation
    teacher included: {setting: [independent, nested]}."""
    defaults = asdict(TrainConfig())  # settings newer than a run read as their defaults, which it trained with
    a = {**defaults, **independent_meta.get("train_config", {})}
    b = {**defaults, **nested_meta.get("train_config", {})}
    out = {k: [a.get(k), b.get(k)] for k in ("epochs", "batch_size", "lr", "weight_decay", "label_smoothing",
                                               "erase_prob", "mix_prob", "ema_decay", "seed")
           if a.get(k) != b.get(k)}
    if _teacher_text(independent_meta) != _teacher_text(nested_meta):
        out["distillation"] = [_teacher_text(independent_meta), _teacher_text(nested_meta)]
    return out


def build_card(model_dir: Path, independent: list[Path], device: str = "cpu") -> dict:
    model = from_pretrained(model_dir, device=device)
    # loaded before the long evaluation, so a wrong folder fails at once
    independent_models = [(folder, from_pretrained(folder, device=device)) for folder in independent]
    cfg = model.config
    x, y = load_fashion_mnist("test")
    trained = [cfg.d_model // lv for lv in cfg.levels]
    configs = mix_n_match_configs(cfg.depth, trained)
    t0 = time.time()
    acc = evaluate(model, x, y, cfg, device, levels=list(cfg.levels), widths_list=configs)
    rows = []
    for lv in cfg.levels:
        name = "D" if lv == 1 else f"D/{lv}"
        c = submodel_cost(cfg, level=lv)
        rows.append({"setting": name, "widths": [cfg.d_model // lv] * cfg.depth, "trained": True,
                     "top1": acc[name], "mflops": c.mflops, "params_m": c.params / 1e6})
    line = [(r["mflops"], r["top1"]) for r in rows]
    for ws in configs:
        name = "mnm:" + ",".join(map(str, ws))
        c = submodel_cost(cfg, widths=ws)
        on_line = interpolate_line(line, c.mflops)
        rows.append({"setting": name, "widths": ws, "trained": False, "top1": acc[name], "mflops": c.mflops,
                     "params_m": c.params / 1e6, "line_top1": on_line, "above_line": acc[name] >= on_line})
    indep = []
    for folder, m in independent_models:
        a = evaluate(m, x, y, m.config, device, levels=[1])["D"]
        c = submodel_cost(m.config, level=1)
        level = cfg.inner_dim // m.config.inner_dim
        nested = next(r for r in rows if r["setting"] == f"D/{level}")
        indep.append({"size": f"D/{level}", "d_inner": m.config.inner_dim, "top1": a, "mflops": c.mflops,
                      "params_m": c.params / 1e6, "nested_top1": nested["top1"],
                      "nested_minus_independent": nested["top1"] - a,
                      "train": m.meta.get("result", {}), "epochs": m.meta.get("result", {}).get("epochs_done"),
                      "config_differences": config_differences(m.config, cfg),
                      "recipe_differences": recipe_differences(m.meta, model.meta)})
    return {"model_dir": str(model_dir), "weights_sha256": weights_hash(model_dir), "rows": rows,
            "independent": indep, "eval_seconds": time.time() - t0, "eval_device": device,
            "eval_machine": (f"{platform.machine()} CPU x{torch.get_num_threads()} threads" if device == "cpu"
                             else torch.cuda.get_device_name(device) if str(device).startswith("cuda") else device)}


def plot(card: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = card["rows"]
    trained = sorted((r for r in rows if r["trained"]), key=lambda r: r["mflops"])
    mnm = [r for r in rows if not r["trained"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["mflops"] for r in trained], [r["top1"] for r in trained], "o-", color="C0",
            label="nested, trained granularities")
    for r in trained:
        ax.annotate(r["setting"], (r["mflops"], r["top1"]), textcoords="offset points", xytext=(4, -12))
    ax.scatter([r["mflops"] for r in mnm], [r["top1"] for r in mnm], color="C1", marker="x", zorder=3,
               label="nested, Mix'n'Match (not trained)")
    if card["independent"]:
        ind = sorted(card["independent"], key=lambda r: r["mflops"])
        ax.plot([r["mflops"] for r in ind], [r["top1"] for r in ind], "s--", color="C2",
                label="independently trained")
    ax.set_xlabel("MFLOPs per 28x28 image")
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _extras(tc: dict, res: dict) -> str:
    """The optional training losses a run used, as recipe text."""
    parts = []
    if tc.get("mnm_samples"):
        parts.append(f"plus {tc['mnm_samples']} pass(es) per step at random per-layer (Mix'n'Match) widths")
    if tc.get("distill"):
        parts.append(f"self-distillation weight {tc['distill']} (T={tc.get('distill_temperature')})")
    if tc.get("align"):
        parts.append(f"embedding alignment weight {tc['align']}")
    if tc.get("teacher"):
        teacher = res.get("teacher", {})
        parts.append(f"every pass distilled from a convolutional teacher (`matsearch train --arch resnet`, "
                     f"{teacher.get('test_top1', float('nan')):.2f}% test top-1, weights sha256 "
                     f"`{teacher.get('weights_sha256', '?')[:12]}…`): loss = {1 - tc['teacher_weight']:g} × "
                     f"cross-entropy + {tc['teacher_weight']:g} × KL at T={tc.get('distill_temperature')}")
    return "".join("; " + p for p in parts)


def _command(tc: dict) -> str:
    """The `matsearch train` command line that reproduces a run from its saved train config."""
    args = ["matsearch train"]
    if tc.get("arch", "matmamba") != "matmamba":
        args += [f"--arch {tc['arch']}", "--levels " + ",".join(map(str, tc.get("levels", [1])))]
    args += [f"--epochs {tc.get('epochs')}", f"--batch-size {tc.get('batch_size')}",
            f"--lr {tc.get('lr')}", f"--warmup-epochs {tc.get('warmup_epochs')}", f"--backend {tc.get('backend')}",
            f"--schedule {tc.get('schedule')}"]
    for key in ("mnm_samples", "distill", "align", "max_minutes", "teacher"):
        if tc.get(key):
            args.append(f"--{key.replace('_', '-')} {tc[key]}")
    if tc.get("teacher"):
        args.append(f"--teacher-weight {tc['teacher_weight']}")
    args += [f"--set {k}={json.dumps(v)}" for k, v in (tc.get("overrides") or {}).items()]
    return " ".join(args)


def _reproduce(tc: dict, res: dict) -> str:
    """The command lines that retrain a run: its distillation teacher's first, where it had one."""
    teacher_tc = res.get("teacher", {}).get("train_config")
    first = f"`{_command(teacher_tc)} --out {Path(tc['teacher']).parent}`, then " if teacher_tc else ""
    return first + f"`{_command(tc)}`"


def _trained_on(config: dict, meta: dict) -> str:
    from vision_model.config import MatMambaVisionConfig
    from vision_model.hub import with_training_data

    return with_training_data(MatMambaVisionConfig.from_dict(config), meta).describe_training()


def markdown(card: dict, config: dict, meta: dict) -> str:
    tc, res = meta.get("train_config", {}), meta.get("result", {})
    rows = card["rows"]
    lines = [f"# {config['name']}: nested MatMamba-Vision trained on Fashion-MNIST", "",
             "A MatMamba-Vision encoder whose four granularities (D, D/2, D/4, D/8) were trained jointly, so every "
             "submodel (and every Mix'n'Match mix of widths) embeds into the same space.", "",
             f"Trained on: {_trained_on(config, meta)} images. Images unlike these (colour photos into a grey model, "
             "images many times its input size) are embedded, but what they show is mostly lost.", "",
             "## Config", "", "| field | value |", "|---|---|"]
    for k in ("img_size", "patch_size", "d_model", "depth", "expand", "d_state", "headdim", "chunk_size",
              "drop_path_rate"):
        lines.append(f"| {k} | {config[k]} |")
    lines += ["", "## Recipe", "",
              f"AdamW (weight decay {tc.get('weight_decay')} on 2-D weights only), lr {tc.get('lr')} with "
              f"{tc.get('warmup_epochs')} warm-up epochs then cosine to {tc.get('min_lr')}, batch {tc.get('batch_size')}, "
              f"gradient clipping {tc.get('clip_grad')}, label smoothing {tc.get('label_smoothing')}, drop-path "
              f"{config['drop_path_rate']}, bf16 autocast, random shift (±3 px) + horizontal flip + random erasing "
              f"(p={tc.get('erase_prob')}); schedule `{tc.get('schedule')}` (each batch at every granularity, "
              f"losses averaged, one optimizer step){_extras(tc, res)}, seed {tc.get('seed')}.", "",
              f"Trained {res.get('epochs_done', 0):.1f} epochs ({res.get('steps')} steps) in "
              f"{res.get('train_seconds_total', res.get('train_seconds_this_run', 0)) / 60:.1f} min on one "
              f"{res.get('device')} (torch {res.get('torch')}, {tc.get('backend', 'auto')} SSD backend)"
              + (f"; the run was planned to fit a {tc['max_minutes']:g}-minute budget" if tc.get("max_minutes") else "")
              + f". Reproduce: {_reproduce(tc, res)}.", "",
              f"## Test accuracy (Fashion-MNIST test, 10,000 images; evaluated in fp32 on {card['eval_machine']})", "",
              "| granularity | params (M) | MFLOPs | top-1 (%) |", "|---|---|---|---|"]
    for r in rows:
        if r["trained"]:
            lines.append(f"| {r['setting']} | {r['params_m']:.2f} | {r['mflops']:.1f} | {r['top1']:.2f} |")
    if card["independent"]:
        lines += ["", "## Nested vs independently trained (epochs as each run reached; config as the nested model's "
                  "unless listed)", "",
                  "| size | independent top-1 | epochs | config and recipe differences (independent / nested) | "
                  "nested top-1 | "
                  "nested − independent |", "|---|---|---|---|---|---|"]
        for r in sorted(card["independent"], key=lambda r: -r["mflops"]):
            ep = f"{r['epochs']:.1f}" if r["epochs"] else "?"
            diff = ", ".join(f"{k} {v[0]} / {v[1]}" for k, v in {**r.get("config_differences", {}),
                                                                 **r.get("recipe_differences", {})}.items()) or "none"
            lines.append(f"| {r['size']} | {r['top1']:.2f} | {ep} | {diff} | {r['nested_top1']:.2f} | "
                         f"{r['nested_minus_independent']:+.2f} |")
    lines += ["", "## Mix'n'Match (per-layer widths, never trained explicitly)", "",
              "![accuracy vs FLOPs](mixnmatch.png)", "",
              "| widths per layer | MFLOPs | top-1 (%) | line between trained neighbours | on/above line |",
              "|---|---|---|---|---|"]
    for r in sorted((r for r in rows if not r["trained"]), key=lambda r: -r["mflops"]):
        lines.append(f"| {','.join(map(str, r['widths']))} | {r['mflops']:.1f} | {r['top1']:.2f} | "
                     f"{r['line_top1']:.2f} | {'yes' if r['above_line'] else 'no'} |")
    above = sum(r["above_line"] for r in rows if not r["trained"])
    total = sum(1 for r in rows if not r["trained"])
    lines += ["", f"{above} of {total} Mix'n'Match configurations lie on or above the straight line between "
              "their neighbouring trained widths.", "",
              f"Weights: `model.safetensors` (bf16), sha256 `{card['weights_sha256']}`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--independent", type=Path, nargs="*", default=[])
    p.add_argument("--device", default="cpu")
    p.add_argument("--render-only", action="store_true",
                   help="no evaluation: rewrite MODEL_CARD.md and the plot from the folder's eval.json")
    args = p.parse_args(argv)
    config, meta = read_config(args.model_dir)
    if args.render_only:
        card = json.loads((args.model_dir / "eval.json").read_text())
    else:
        card = build_card(args.model_dir, args.independent, args.device)
        atomic_write(args.model_dir / "eval.json", json.dumps(card, indent=2).encode())
    plot(card, args.model_dir / "mixnmatch.png")
    atomic_write(args.model_dir / "MODEL_CARD.md", markdown(card, config.to_dict(), meta).encode())
    print((args.model_dir / "MODEL_CARD.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
