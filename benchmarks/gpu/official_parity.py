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


def make_fixtures(directory: Path) -> None:
    import torch
    from safetensors.torch import save_file
    matmamba = import_official(cpu=True)
    torch.manual_seed(0)
    t = dict(TINY)
    ssm = {"d_state": t.pop("d_state"), "chunk_size": t.pop("chunk_size")}
    model = matmamba.MatMamba2Vision(official_config(matmamba, **t, **ssm)).eval()
    randomize(model, 1)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory / "checkpoint"))
    x = torch.randn(2, 3, TINY["image_size"], TINY["image_size"], generator=torch.Generator().manual_seed(2))
    start = time.time()
    outs = official_outputs(model, x, LEVELS, TINY_MNM)
    tensors = {"x": x.contiguous()}
    for label, (logits, feats) in outs.items():
        tensors[f"logits_{label}"], tensors[f"features_{label}"] = logits.contiguous(), feats.contiguous()
    save_file(tensors, str(directory / "expected.safetensors"))
    (directory / "expected.json").write_text(json.dumps({
        "levels": list(LEVELS), "mnm_widths": TINY_MNM,
        "made_by": "python3 -m benchmarks.gpu.official_parity --fixtures DIR (official code under "
                   "TRITON_INTERPRET=1 on CPU: fp32 dots, no TF32)",
        "official_commit": (find_official() / "COMMIT").read_text().split()[0]}, indent=2) + "\n")
    print(f"wrote {directory} in {time.time() - start:.0f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", type=Path, help="regenerate the golden fixtures in this folder (CPU) and exit")
    ap.add_argument("--out", type=Path, help="folder for official_parity.json (GPU run)")
    args = ap.parse_args(argv)
    if args.fixtures:
        make_fixtures(args.fixtures)
        return 0
    raise SystemExit("GPU mode: see below")


if __name__ == "__main__":
    sys.exit(main())
