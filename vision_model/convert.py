"""Import the paper's released checkpoints (ScaledFoundations/MatMamba, `MatMamba2Vision`) as model folders of ours.

An official checkpoint is a folder with `config.json` (the fields of `MatMamba2VisionConfig`) and `pytorch_model.bin`
(a plain state_dict written by `torch.save`) or `model.safetensors`.  Its architecture maps onto ours exactly:

    official                                      ours (MatMambaVisionConfig)
    d_model, n_layer, n_classes                   d_model, depth, num_classes
    image_size, patch_size                        img_size, patch_size (timm PatchEmbed with bias: patch_bias)
    rms_norm=False: nn.LayerNorm pre-norms        norm="layernorm" (else "rmsnorm")
    pos_embed of n_patches + 1 rows, CLS last     cls_pos=True
    mixer head dim d_model // 32 (hard-coded)     headdim = d_model // 32
    ssm_cfg d_state, d_conv, chunk_size           d_state, d_conv, chunk_size
    pool "cls" / "avg"                            pool
    mrl_level L, mixnmatch_dims w per layer       level=L, widths=[w, ...] (both in d_model units)

State-dict keys: `layers.i.` -> `blocks.i.`, `layers.i.mixer.norm.weight` -> `blocks.i.mixer.norm_weight`,
`norm_f.` -> `norm.`; every other key (patch_embed, pos_embed, cls_token, head, in_proj, conv1d, dt_bias, A_log, D,
out_proj) keeps its name, and every shape must match.  Options the official code has but the released models do not
use (MLP or attention layers, ngroups > 1, a biased in_proj, a dt limit, ...) are refused by name rather than
imported wrongly.  `.bin` files are read with `torch.load(weights_only=True, map_location="cpu")` only: no code in a
checkpoint ever runs, and tensors saved on a GPU load on a CPU-only machine.

The result carries the preprocessing the paper evaluated with (ImageNet mean/std, short side resized to
image_size / 0.875 = 256, centre crop 224) and a model card (README.md) saying what the model was trained on.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .config import MatMambaVisionConfig
from .fileio import atomic_write
from .hub import CONFIG_FILE, WEIGHTS_FILE, save_pretrained

OFFICIAL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# ImageNet evaluation crop ratio of the paper's models (224 of 256)
EVAL_CROP_RATIO = 0.875

# MatMamba2VisionConfig's fields, and what becomes of each
OFFICIAL_FIELDS = {
    "d_model", "n_layer", "d_intermediate", "n_classes", "patch_size", "image_size", "ssm_cfg", "attn_layer_idx",
    "attn_cfg", "norm_epsilon", "rms_norm", "initializer_cfg", "fused_add_norm", "residual_in_fp32", "drop_rate",
    "drop_path_rate", "proj_drop_rate", "pool", "device", "dtype"}
# fields that only matter for initialisation, training or placement: accepted, no effect on the imported model
# (fused_add_norm and residual_in_fp32 change how the same sum is computed, not what)
IGNORED_FIELDS = {"initializer_cfg", "fused_add_norm", "residual_in_fp32", "drop_rate", "proj_drop_rate", "device",
                  "dtype"}
# MatMamba2's constructor arguments (ssm_cfg): required values where the official code offers other behaviour
SSM_REQUIRED = {"layer": "MatMamba2", "ngroups": 1, "d_ssm": None, "D_has_hdim": False, "rmsnorm": True,
                "norm_before_gate": False, "bias": False, "conv_bias": True, "expand": 2}
# init-only or speed-only arguments; `headdim` is overridden by the official code itself (always d_model // 32)
SSM_IGNORED = {"conv_init", "A_init_range", "dt_min", "dt_max", "dt_init_floor", "headdim", "use_mem_eff_path",
               "sequence_parallel", "process_group", "device", "dtype"}
SSM_MAPPED = {"d_state": "d_state", "d_conv": "d_conv", "chunk_size": "chunk_size"}


class CheckpointError(ValueError):
    """An official checkpoint that cannot be imported; the message names the file and the problem."""


# -- config --------------------------------------------------------------------------------------------------------

def read_official_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else []
        raise CheckpointError(f"{folder}: not an official MatMamba checkpoint folder (no config.json; it holds "
                              f"{present or 'nothing'}); expected config.json + pytorch_model.bin or model.safetensors")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: expected a JSON object of MatMamba2VisionConfig fields")
    if "config" in doc and "d_model" not in doc:
        raise CheckpointError(f"{path}: this is already a matmamba-search model folder: load it with "
                              "vision_model.load_model, there is nothing to import")
    unknown = sorted(set(doc) - OFFICIAL_FIELDS)
    if unknown:
        raise CheckpointError(f"{path}: unknown config fields {unknown}: not a MatMamba2VisionConfig "
                              f"(its fields: {sorted(OFFICIAL_FIELDS)})")
    for key in ("d_model", "n_layer"):
        if not isinstance(doc.get(key), int):
            raise CheckpointError(f"{path}: {key} must be an integer, got {doc.get(key)!r}")
    return doc


def _require(path: Path, what: str, value, wanted) -> None:
    same = (value == wanted) if not isinstance(wanted, float) else math.isclose(value, wanted)
    if not same:
        raise CheckpointError(f"{path}: {what}={value!r} is not supported (only {wanted!r}, as in the paper's models)")


def config_from_official(doc: dict, path: Path, name: str = "matmamba_vision_imported",
                         class_names: tuple[str, ...] = ()) -> MatMambaVisionConfig:
    """Our config for an official config.json's fields (validated by `read_official_config`)."""
    _require(path, "d_intermediate", doc.get("d_intermediate", 0), 0)
    _require(path, "attn_layer_idx", list(doc.get("attn_layer_idx") or []), [])
    ssm = doc.get("ssm_cfg") or {}
    if not isinstance(ssm, dict):
        raise CheckpointError(f"{path}: ssm_cfg must be an object, got {ssm!r}")
    unknown = sorted(set(ssm) - set(SSM_REQUIRED) - SSM_IGNORED - set(SSM_MAPPED) - {"dt_limit"})
    if unknown:
        raise CheckpointError(f"{path}: unknown ssm_cfg fields {unknown}")
    for key, wanted in SSM_REQUIRED.items():
        if key in ssm:
            _require(path, f"ssm_cfg.{key}", ssm[key], wanted)
    if "dt_limit" in ssm and list(ssm["dt_limit"]) != [0.0, float("inf")]:
        raise CheckpointError(f"{path}: ssm_cfg.dt_limit={ssm['dt_limit']!r} is not supported (only no limit)")
    d_model = doc["d_model"]
    if d_model < 32 or d_model % 32:
        raise CheckpointError(f"{path}: d_model={d_model} must be a multiple of 32 (the mixer's head dim is d_model/32)")
    image_size, patch_size = doc.get("image_size", 224), doc.get("patch_size", 16)
    pool = doc.get("pool", "cls")
    if pool not in ("cls", "avg"):
        raise CheckpointError(f"{path}: pool={pool!r} must be 'cls' or 'avg'")
    kwargs = {ours: ssm[theirs] for theirs, ours in SSM_MAPPED.items() if theirs in ssm}
    try:
        return MatMambaVisionConfig(
            name=name, img_size=image_size, patch_size=patch_size, in_chans=3, num_classes=doc.get("n_classes", 1000),
            d_model=d_model, depth=doc["n_layer"], expand=2, headdim=d_model // 32,
            drop_path_rate=doc.get("drop_path_rate", 0.0),
            norm="rmsnorm" if doc.get("rms_norm", False) else "layernorm", norm_eps=doc.get("norm_epsilon", 1e-5),
            cls_pos=True, pool=pool, patch_bias=True, crop="center",
            resize_size=round(image_size / EVAL_CROP_RATIO), class_names=tuple(class_names), **kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def imagenet_class_names(n_classes: int) -> tuple[str, ...]:
    """The ImageNet-1k class names in label order (timm's copy), for a 1000-class head; else none."""
    if n_classes != 1000:
        return ()
    from timm.data import ImageNetInfo
    return tuple(ImageNetInfo().label_descriptions())


# -- weights ---------------------------------------------------------------------------------------------------------

def read_official_weights(folder: Path) -> tuple[dict[str, Tensor], Path]:
    """The state_dict of an official checkpoint folder, on the CPU; only tensors, nothing executed."""
    for fname in OFFICIAL_WEIGHT_FILES:
        path = folder / fname
        if path.is_file():
            break
    else:
        raise CheckpointError(f"{folder}: no weights: expected {' or '.join(OFFICIAL_WEIGHT_FILES)} beside "
                              "config.json")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError (objects other than tensors), RuntimeError (not a checkpoint)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "weights_only" in str(e) or "Unsupported global" in str(e) or "pickle" in type(e).__name__.lower():
                raise CheckpointError(f"{path}: holds Python objects other than tensors, refused (checkpoints are read "
                                      f"with torch.load(weights_only=True): no code runs) — {first}") from None
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state_dict (a mapping of names to "
                              "tensors)")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor: not a plain "
                                  "state_dict")
    return state, path


def our_key(key: str) -> str:
    """An official state_dict key as ours."""
    key = re.sub(r"^layers\.(\d+)\.", r"blocks.\1.", key)
    key = re.sub(r"^(blocks\.\d+\.mixer)\.norm\.weight$", r"\1.norm_weight", key)
    return re.sub(r"^norm_f\.", "norm.", key)


def official_key(key: str) -> str:
    """Our state_dict key as the official code names it (inverse of `our_key`)."""
    key = re.sub(r"^(blocks\.\d+\.mixer)\.norm_weight$", r"\1.norm.weight", key)
    key = re.sub(r"^blocks\.(\d+)\.", r"layers.\1.", key)
    return re.sub(r"^norm\.", "norm_f.", key)


def convert_state_dict(state: dict[str, Tensor], expected: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Official state_dict -> ours, checked against `expected` (our model's state_dict: names and shapes)."""
    converted = {our_key(k): v for k, v in state.items()}
    missing = sorted(official_key(k) for k in expected if k not in converted)
    extra = sorted(k for k in state if our_key(k) not in expected)
    if missing:
        raise CheckpointError(f"{path}: missing weights {_few(missing)} that config.json's architecture needs")
    if extra:
        raise CheckpointError(f"{path}: unexpected weights {_few(extra)} that config.json's architecture has no "
                              "place for")
    for k, v in converted.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{path}: {official_key(k)} has shape {tuple(v.shape)}, config.json's architecture "
                                  f"needs {tuple(expected[k].shape)}")
        if not v.is_floating_point():
            raise CheckpointError(f"{path}: {official_key(k)} is {v.dtype}, expected floating point weights")
    return converted


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


# -- sources ---------------------------------------------------------------------------------------------------------

def resolve_source(src: str) -> tuple[Path, str]:
    """(local folder, description) for SRC: a folder, or hf:ORG/NAME downloaded with huggingface_hub."""
    if not src.startswith("hf:"):
        return Path(src), str(Path(src).resolve())
    repo = src[3:].strip("/")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise CheckpointError(f"{src}: expected hf:ORG/NAME, e.g. hf:scaledfoundations/MatMamba-Vision-135M-ImageNet")
    hint = (f"download it where a network exists (`huggingface-cli download {repo} --local-dir DIR`) and import "
            "the folder: `matsearch model import DIR --out ...`")
    try:
        from huggingface_hub import snapshot_download
        folder = snapshot_download(repo, allow_patterns=["config.json", *OFFICIAL_WEIGHT_FILES, "README.md"])
    except Exception as e:  # offline (HF_HUB_OFFLINE=1), no network, unknown repo, gated repo
        reason = str(e).strip().splitlines()[0].split(". ")[0][:200] if str(e).strip() else "no detail"
        raise CheckpointError(f"{src}: could not download from the Hugging Face Hub ({type(e).__name__}: "
                              f"{reason}); {hint}") from None
    return Path(folder), f"https://huggingface.co/{repo}"


# -- import ----------------------------------------------------------------------------------------------------------

def load_official(folder: str | os.PathLike, name: str = "matmamba_vision_imported"):
    """An official checkpoint folder as a MatMambaVision model (CPU, the checkpoint's dtype) and its config doc."""
    from .model import MatMambaVision
    folder = Path(folder)
    doc = read_official_config(folder)
    config = config_from_official(doc, folder / "config.json", name=name,
                                  class_names=imagenet_class_names(doc.get("n_classes", 1000)))
    state, path = read_official_weights(folder)
    model = MatMambaVision(config, ssd_backend="auto")
    converted = convert_state_dict(state, model.state_dict(), path)
    dtypes = {v.dtype for v in converted.values()}
    model = model.to(dtypes.pop() if len(dtypes) == 1 else torch.float32)
    model.load_state_dict(converted, strict=True)
    return model.eval(), doc


def import_checkpoint(src: str, out: str | os.PathLike, name: str | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    """Import SRC (folder or hf:ORG/NAME) into the model folder OUT (written whole or not at all); returns OUT.
    dtype None keeps the checkpoint's dtype (fp32 for the paper's)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists and is not empty; choose a new --out")
    folder, source = resolve_source(src)
    name = name or re.sub(r"[^\w.-]+", "_", folder.name if not src.startswith("hf:") else src[3:].split("/")[-1])
    model, doc = load_official(folder, name=name)
    meta = {"trained_on": "ImageNet-1k classification (1000 classes)" if model.config.num_classes == 1000
            else f"{model.config.num_classes}-class classification (see the source)",
            "source": source, "imported_from": src, "official_config": doc,
            "params": sum(p.numel() for p in model.parameters())}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_pretrained(model, tmp, dtype=dtype, extra=meta)
        atomic_write(tmp / "README.md", model_card(model.config, meta).encode())
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def model_card(config: MatMambaVisionConfig, meta: dict) -> str:
    levels = ", ".join("D" if lv == 1 else f"D/{lv}" for lv in config.levels)
    return f"""# {config.name}

MatMamba-Vision ({meta['params'] / 1e6:.1f}M parameters): the paper's architecture and released weights, imported
with `matsearch model import`.

- **Trained on**: {meta['trained_on']}, by the paper's authors (MatMamba, Shukla et al., 2024). Not trained or
  fine-tuned by this project; its retrieval quality on other images is whatever the ImageNet features give.
- **Source**: {meta['source']} (imported from `{meta['imported_from']}`).
- **Architecture**: d_model {config.d_model}, {config.depth} MatMamba2 layers, LayerNorm pre-norms
  ({config.norm}), head dim {config.headdim}, d_state {config.d_state}, patch {config.patch_size} at {config.img_size} px,
  CLS token last with its own positional row, {config.pool} pooling; nested granularities {levels} and Mix'n'Match
  widths (one per layer, in d_model units: the official `mixnmatch_dims`).
- **Preprocessing** (as evaluated in the paper): RGB, short side resized to {config.resize_size}, centre crop
  {config.img_size}, ImageNet mean {list(config.mean)} / std {list(config.std)}.
- **Files**: `{WEIGHTS_FILE}` (weights) and `{CONFIG_FILE}` (`config`: the architecture; `meta.official_config`:
  the checkpoint's own config.json).

Use: `vision_model.load_model(DIR)`, `matsearch index build --model DIR ...`, `matsearch search`, `matsearch app`.
"""
