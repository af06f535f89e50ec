"""Parity with the paper's official MatMamba-Vision code, and speed against it (GPU), or the golden fixtures (CPU).

    python3 -m benchmarks.gpu.official_parity --out $OUT                  # H200: parity table, then throughput
    python3 -m benchmarks.gpu.official_parity --fixtures tests/fixtures/official_tiny   # CPU: regenerate fixtures

The official code (ScaledFoundations/MatMamba, read-only) is the oracle.  It is looked for in $MATMAMBA_OFFICIAL,
then `.ref/matmamba-official` in the repository (an ignored folder: copy `shared/reference/matmamba-official` there
to carry it to the device), then `/work/shared/reference/matmamba-official`.  It needs mamba-ssm (the wheel in
shared/wheels) and runs its Triton kernels; on a machine without CUDA they run under Triton's CPU interpreter
(TRITON_INTERPRET=1, set here before Triton is imported), with mamba-ssm's deterministic mode choosing one launch
config instead of autotuning, which the interpreter cannot time.

GPU run: random official checkpoints of a few shapes (the 35M and 135M shapes at 224 px among them) are saved in the
official format (`save_pretrained`: config.json + pytorch_model.bin with CUDA tensors), imported with
`vision_model.convert.import_checkpoint`, and compared at D, D/2, D/4, D/8 and a Mix'n'Match config: logits and
features, relative error ||ours - official|| / ||official||, fp32 on both our backends (official Triton dots round to
TF32) and bf16 autocast.  Then images/s of ours (every level) against the official code (every level) and timm
ViT-B/16 at 224 and 1024 px, bf16.  The table is printed last and everything is written to OUT/official_parity.json.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

from benchmarks.measure import rel_error as rel

REPO = Path(__file__).resolve().parents[2]
OFFICIAL_CANDIDATES = (REPO / ".ref" / "matmamba-official", Path("/work/shared/reference/matmamba-official"))


def find_official() -> Path:
    env = os.environ.get("MATMAMBA_OFFICIAL")
    for path in ([Path(env)] if env else []) + list(OFFICIAL_CANDIDATES):
        if (path / "matmamba" / "matmamba2_vision.py").is_file():
            return path
    raise SystemExit("official MatMamba code not found: copy shared/reference/matmamba-official to "
                     f"{REPO / '.ref' / 'matmamba-official'} or set MATMAMBA_OFFICIAL")


def import_official(cpu: bool):
    """The official `matmamba` package. On CPU: Triton's interpreter, one launch config, and no CUDA device context
    (mamba-ssm enters `torch.cuda.device(t.device.index)` around its launches, which fails without CUDA)."""
    if cpu:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("Triton was imported before TRITON_INTERPRET=1 could be set: run this as its own process")
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["MAMBA_DETERMINISTIC"] = "1"
    import torch
    if cpu and not torch.cuda.is_available():
        torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
    # mamba-ssm's package __init__ imports its Mamba-1 CUDA extension, which the vision model never calls
    if "selective_scan_cuda" not in sys.modules and importlib.util.find_spec("selective_scan_cuda") is None:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    sys.path.insert(0, str(find_official()))
    import matmamba
    return matmamba


def official_config(matmamba, d_model: int, n_layer: int, image_size: int, patch_size: int = 16,
                    n_classes: int = 1000, pool: str = "cls", **ssm):
    # use_mem_eff_path=False: the fused path needs the causal_conv1d package, which neither machine has; it is the
    # same computation
    return matmamba.MatMamba2VisionConfig(d_model=d_model, n_layer=n_layer, n_classes=n_classes, image_size=image_size,
                                          patch_size=patch_size, pool=pool,
                                          ssm_cfg={"use_mem_eff_path": False, **ssm})


def randomize(model, seed: int) -> None:
    """Move the parameters the official init leaves constant (norm weights 1, biases and CLS 0, D 1) off those values,
    so a mixed-up weight or a dropped bias shows in the outputs."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
            if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
                p.copy_(1 + 0.3 * noise)
            elif name.endswith("bias") and "dt_bias" not in name and "conv1d" not in name:
                p.copy_(0.3 * noise)
            elif name == "cls_token":
                p.copy_(noise)


def set_mixnmatch(model, widths) -> None:
    """The official way to run a Mix'n'Match submodel: one width per layer on the mixers (None: off)."""
    for layer, w in zip(model.layers, widths or [None] * len(model.layers)):
        layer.mixer.mixnmatch = w is not None
        layer.mixer.mixnmatch_dims = w if w is not None else layer.mixer.d_model


def official_outputs(model, x, levels, mnm_widths) -> dict:
    """{label: (logits, features)} of the official model at each level and the Mix'n'Match widths."""
    import torch
    out = {}
    with torch.no_grad():
        for lv in levels:
            out[f"L{lv}"] = model(x, mrl_level=lv, return_features=True)
        set_mixnmatch(model, mnm_widths)
        out["mnm"] = model(x, return_features=True)
        set_mixnmatch(model, None)
    return out


# -- golden fixtures (CPU) ----------------------------------------------------------------------------------------

TINY = dict(d_model=64, n_layer=2, image_size=32, patch_size=8, n_classes=10, d_state=16, chunk_size=8)
TINY_MNM = [64, 16]
LEVELS = (1, 2, 4, 8)


def fixture_settings() -> list[str]:
    return [f"L{lv}" for lv in LEVELS] + ["mnm"]


def make_fixtures(directory: Path, jobs: int = 1) -> None:
    """The checkpoint (official save_pretrained) and the official outputs for every setting. The interpreter is slow
    and the settings are independent, so with jobs > 1 each setting runs in a process of its own."""
    import subprocess

    import torch
    from safetensors.torch import load_file, save_file
    start = time.time()
    matmamba = import_official(cpu=True)
    ckpt = directory / "checkpoint"
    if not (ckpt / "pytorch_model.bin").is_file():
        torch.manual_seed(0)
        t = dict(TINY)
        ssm = {"d_state": t.pop("d_state"), "chunk_size": t.pop("chunk_size")}
        model = matmamba.MatMamba2Vision(official_config(matmamba, **t, **ssm)).eval()
        randomize(model, 1)
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(ckpt))
    settings = fixture_settings()
    if jobs > 1:
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.gpu.official_parity", "--fixtures", str(directory),
                                   "--only", s]) for s in settings]
        if any(p.wait() for p in procs):
            raise SystemExit("a fixture process failed")
    else:
        for s in settings:
            fixture_part(matmamba, directory, s)
    tensors = {}
    for s in settings:
        tensors.update(load_file(str(directory / f".part_{s}.safetensors")))
    save_file(tensors, str(directory / "expected.safetensors"))
    for s in settings:
        (directory / f".part_{s}.safetensors").unlink()
    (directory / "expected.json").write_text(json.dumps({
        "levels": list(LEVELS), "mnm_widths": TINY_MNM,
        "made_by": "python3 -m benchmarks.gpu.official_parity --fixtures DIR (official code under "
                   "TRITON_INTERPRET=1 on CPU: fp32 dots, no TF32)",
        "official_commit": (find_official() / "COMMIT").read_text().split()[0]}, indent=2) + "\n")
    print(f"wrote {directory} in {time.time() - start:.0f} s")


def fixture_part(matmamba, directory: Path, setting: str) -> None:
    """The official logits and features of one setting (L1 ... L8, mnm) for the fixture's inputs."""
    import torch
    from safetensors.torch import save_file
    ckpt = directory / "checkpoint"
    model = matmamba.MatMamba2Vision(matmamba.MatMamba2VisionConfig(**json.loads((ckpt / "config.json").read_text())))
    model.load_state_dict(torch.load(ckpt / "pytorch_model.bin", map_location="cpu", weights_only=True))
    model.eval()
    x = torch.randn(2, 3, TINY["image_size"], TINY["image_size"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        if setting == "mnm":
            set_mixnmatch(model, TINY_MNM)
            logits, feats = model(x, return_features=True)
        else:
            logits, feats = model(x, mrl_level=int(setting[1:]), return_features=True)
    tensors = {f"logits_{setting}": logits.contiguous(), f"features_{setting}": feats.contiguous()}
    if setting == "L1":
        tensors["x"] = x.contiguous()
    save_file(tensors, str(directory / f".part_{setting}.safetensors"))


# -- parity and speed (GPU) ---------------------------------------------------------------------------------------

# (label, official config kwargs, parity batch); pool/rms_norm variants exercise the importer's other mappings
SHAPES = {
    "35m": ("35M @224", dict(d_model=512, n_layer=20, image_size=224), 8),
    "135m": ("135M @224", dict(d_model=1024, n_layer=20, image_size=224), 8),
    # CPU smoke run of this script (the official code under Triton's interpreter): --shapes tiny --speed-models ''
    "tiny": ("64x2 @32", dict(d_model=64, n_layer=2, image_size=32, patch_size=8, n_classes=10, d_state=16), 2),
    "small": ("256x4 rms avg @128", dict(d_model=256, n_layer=4, image_size=128, pool="avg", rms_norm=True), 4),
}
TOL = {"fp32": 2e-3, "bf16": 2e-2}


def mnm_widths(d_model: int, n_layer: int) -> list[int]:
    return [d_model // (1, 2, 4, 8)[i % 4] for i in range(n_layer)]


def build_official(matmamba, device, seed: int, rms_norm: bool = False, **kw):
    import torch
    torch.manual_seed(seed)
    cfg = official_config(matmamba, **kw)
    cfg.rms_norm = rms_norm
    with torch.device(device):  # initialise where it runs: the 135M init takes seconds on the CPU
        return matmamba.MatMamba2Vision(cfg).to(device).eval()


def parity(matmamba, key: str, levels, workdir: Path) -> list[dict]:
    """One random official checkpoint, saved the official way on the GPU, imported, compared."""
    import torch

    import vision_model
    from vision_model.convert import import_checkpoint
    label, kw, batch = SHAPES[key]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends, precisions = (("torch", "triton"), TOL) if device == "cuda" else (("torch",), ["fp32"])
    official = build_official(matmamba, device, 0, **kw)
    randomize(official, 1)
    ckpt, ours_dir = workdir / f"{key}_official", workdir / f"{key}_ours"
    official.save_pretrained(str(ckpt))  # pytorch_model.bin with CUDA storages
    t0 = time.time()
    import_checkpoint(str(ckpt), ours_dir)
    import_s = time.time() - t0
    ours = vision_model.load_model(ours_dir).to(device).eval()
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(batch, 3, kw["image_size"], kw["image_size"], device=device, generator=g)
    widths = mnm_widths(kw["d_model"], kw["n_layer"])
    want = official_outputs(official, x, levels, widths)
    official_bf16 = {"error": "not run on CPU"}
    if device == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            try:
                official_bf16 = official_outputs(official, x, levels, widths)
            except Exception as e:  # the official code's own bf16 run is context only
                official_bf16 = {"error": repr(e)[:200]}
    rows = []
    for setting in [f"L{lv}" for lv in levels] + ["mnm"]:
        kwargs = dict(widths=widths) if setting == "mnm" else dict(level=int(setting[1:]))
        ref_logits, ref_feats = (t.float() for t in want[setting])
        row = {"shape": label, "setting": "D" if setting == "L1" else ("mnm" if setting == "mnm" else
                                                                       f"D/{setting[1:]}"), "import_s": round(import_s, 1)}
        with torch.no_grad():
            for backend in backends:
                logits, feats = ours(x, backend=backend, return_embedding=True, **kwargs)
                row[f"fp32_{backend}"] = max(rel(logits, ref_logits), rel(feats, ref_feats))
                if "bf16" in precisions:
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        logits, feats = ours(x, backend=backend, return_embedding=True, **kwargs)
                    row[f"bf16_{backend}"] = max(rel(logits.float(), ref_logits), rel(feats.float(), ref_feats))
        if "error" not in official_bf16:
            row["official_bf16"] = max(rel(official_bf16[setting][0].float(), ref_logits),
                                       rel(official_bf16[setting][1].float(), ref_feats))
        row["ok"] = all(row[f"{p}_{b}"] <= TOL[p] for p in precisions for b in backends)
        rows.append(row)
        print(json.dumps(row), flush=True)
    del official, ours
    torch.cuda.empty_cache()
    return rows


def images_per_s(fn, x, min_s: float = 0.6, max_iters: int = 30) -> float:
    import torch
    with torch.inference_mode():
        for _ in range(3):  # warm-up, Triton autotuning
            fn(x)
        torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while n < max_iters and (n < 3 or time.perf_counter() - t0 < min_s):
            fn(x)
            n += 1
        torch.cuda.synchronize()
        return n * x.shape[0] / (time.perf_counter() - t0)


SPEED_BATCH = {224: 128, 1024: 16}


def speed(matmamba, models, sizes, levels, deadline: float) -> list[dict]:
    """bf16 images/s: ours at every level, the official code at every level, timm ViT-B/16."""
    import timm
    import torch

    import vision_model
    rows = []

    def record(**row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    for size in sizes:
        batch = SPEED_BATCH.get(size, 8)
        x = torch.randn(batch, 3, size, size, device="cuda", dtype=torch.bfloat16)
        for key in models:
            _, kw, _ = SHAPES[key]
            kw = {**kw, "image_size": size}
            with torch.device("cuda"):
                ours = vision_model.create_model(f"matmamba_vision_{key}", img_size=size, resize_size=None)
            ours = ours.to(torch.bfloat16).eval()
            official = build_official(matmamba, "cuda", 0, **kw).to(torch.bfloat16)
            for lv in levels:
                for impl, fn in (("ours", lambda t: ours.embed(t, level=lv)),
                                 ("official", lambda t: official(t, mrl_level=lv, return_features=True))):
                    if time.time() > deadline:
                        record(model=key, impl=impl, img=size, level=lv, skipped="time budget")
                        continue
                    record(model=key, impl=impl, img=size, level=lv, batch=batch, img_s=round(images_per_s(fn, x), 1))
            del ours, official
            torch.cuda.empty_cache()
        if time.time() < deadline:
            vit = timm.create_model("vit_base_patch16_224", img_size=size).cuda().to(torch.bfloat16).eval()
            record(model="vit_base_patch16", impl="timm", img=size, level=1, batch=batch,
                   img_s=round(images_per_s(vit, x), 1))
            del vit
    return rows


def table(parity_rows, speed_rows) -> str:
    lines = ["parity: max(rel err logits, rel err features) vs the official fp32 outputs "
             f"(tolerance fp32 {TOL['fp32']}, bf16 {TOL['bf16']})",
             f"{'shape':<20} {'setting':<7} {'fp32 torch':>10} {'fp32 triton':>11} {'bf16 torch':>10} "
             f"{'bf16 triton':>11} {'off. bf16':>9}  ok"]
    nan = float("nan")
    for r in parity_rows:
        lines.append(f"{r['shape']:<20} {r['setting']:<7} {r['fp32_torch']:>10.2e} {r.get('fp32_triton', nan):>11.2e} "
                     f"{r.get('bf16_torch', nan):>10.2e} {r.get('bf16_triton', nan):>11.2e} "
                     f"{r.get('official_bf16', nan):>9.2e}  {'yes' if r['ok'] else 'NO'}")
    if speed_rows:
        lines.append("throughput, bf16, images/s (ours: embed; official: forward)")
        levels = sorted({r["level"] for r in speed_rows})
        lines.append(f"{'model':<18} {'impl':<9} {'img':>5} " + " ".join(f"{'L' + str(lv):>9}" for lv in levels))
        groups = {}
        for r in speed_rows:
            groups.setdefault((r["model"], r["impl"], r["img"]), {})[r["level"]] = r.get("img_s")
        for (model, impl, img), by_level in groups.items():
            cells = " ".join(f"{by_level[lv]:>9.1f}" if by_level.get(lv) else f"{'-':>9}" for lv in levels)
            lines.append(f"{model:<18} {impl:<9} {img:>5} {cells}")
    return "\n".join(lines)


def _cuda_available() -> bool:
    """torch.cuda.is_available() without importing Triton (torch itself does not)."""
    import torch
    return torch.cuda.is_available()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", type=Path, help="regenerate the golden fixtures in this folder (CPU) and exit")
    ap.add_argument("--jobs", type=int, default=5, help="with --fixtures: processes, one per setting (default 5)")
    ap.add_argument("--only", choices=fixture_settings(), help=argparse.SUPPRESS)  # one setting of --fixtures
    ap.add_argument("--out", type=Path, help="folder for official_parity.json (GPU run)")
    ap.add_argument("--shapes", default="small,35m,135m", help="parity shapes, from " + ",".join(SHAPES))
    ap.add_argument("--speed-models", default="135m,35m", help="throughput of these shapes ('' for none)")
    ap.add_argument("--sizes", default="1024,224", help="throughput image sizes (first the one that matters most: "
                                                        "rows past --budget-s are skipped)")
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--budget-s", type=float, default=280, help="skip throughput rows after this many seconds")
    args = ap.parse_args(argv)
    if args.fixtures and args.only:
        fixture_part(import_official(cpu=True), args.fixtures, args.only)
        return 0
    if args.fixtures:
        make_fixtures(args.fixtures, args.jobs)
        return 0
    started = time.time()
    cpu = importlib.util.find_spec("torch") is not None and not _cuda_available()
    matmamba = import_official(cpu=cpu)  # before anything imports Triton
    import torch
    if cpu and (args.speed_models or set(args.shapes.split(",")) - {"tiny"}):
        raise SystemExit("without CUDA only the smoke run: --shapes tiny --speed-models '' (fixtures: --fixtures DIR)")
    levels = [int(v) for v in args.levels.split(",")]
    parity_rows = []
    with tempfile.TemporaryDirectory() as work:
        for key in [k for k in args.shapes.split(",") if k]:
            parity_rows += parity(matmamba, key, levels, Path(work))
    models = [k for k in args.speed_models.split(",") if k]
    speed_rows = speed(matmamba, models, [int(v) for v in args.sizes.split(",")], levels,
                       started + args.budget_s) if models else []
    result = {"device": "cpu (Triton interpreter)" if cpu else torch.cuda.get_device_name(), "torch": torch.__version__, "parity": parity_rows,
              "speed": speed_rows, "wall_s": round(time.time() - started, 1),
              "all_parity_ok": all(r["ok"] for r in parity_rows)}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "official_parity.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(parity_rows, speed_rows))
    print(f"wall {result['wall_s']} s; parity {'OK' if result['all_parity_ok'] else 'FAILED'}")
    return 0 if result["all_parity_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
