"""Checkpoints: safetensors weights + a JSON config in one folder. Nothing is unpickled or executed on load."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path

import safetensors.torch
import torch
from safetensors.torch import load_file

from .config import MatMambaVisionConfig
from .device import resolve_device
from .fileio import atomic_write
from .model import MatMambaVision

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
WEIGHTS_DIR = Path(__file__).parent / "weights"  # shipped model folders, each loadable by its folder name
DEFAULT_MODEL_DIR = WEIGHTS_DIR / "matmamba_vision_fmnist"


def save_pretrained(model: MatMambaVision, directory: str | os.PathLike, dtype: torch.dtype | None = torch.bfloat16,
                    extra: dict | None = None) -> Path:
    """Save weights (cast to `dtype`, None keeps them) and config; `extra` goes into config.json's "meta"."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, safetensors.torch.save(tensors, metadata={"format": "pt"}))
    doc = {"config": model.config.to_dict(), "meta": extra or {}}
    if getattr(model, "arch", None):  # a distillation teacher: its network, on the encoder's data config
        doc["arch"] = model.arch
    atomic_write(directory / CONFIG_FILE, json.dumps(doc, indent=2).encode())
    return directory


def read_config(directory: str | os.PathLike) -> tuple[MatMambaVisionConfig, dict]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    doc = json.loads(path.read_text())
    if "arch" in doc:
        raise ValueError(f"{Path(directory)} holds a {doc['arch'].get('name')} distillation teacher, not a "
                         f"MatMamba-Vision encoder: pass it to `matsearch train --teacher`, or pick an encoder folder")
    meta = doc.get("meta", {})
    return with_training_data(MatMambaVisionConfig.from_dict(doc["config"]), meta), meta


def with_training_data(config: MatMambaVisionConfig, meta: dict) -> MatMambaVisionConfig:
    """`config` with `trained_on` filled in, where it is empty, from an import's meta.trained_on or the training
    record (meta.train_config.data)."""
    meta = meta if isinstance(meta, dict) else {}
    if config.trained_on:
        return config
    if meta.get("trained_on"):  # an imported checkpoint says it in words
        return dataclasses.replace(config, trained_on=str(meta["trained_on"]))
    data = (meta.get("train_config") or {}).get("data")
    if not isinstance(data, str):
        return config
    if data == "fashion-mnist":
        return dataclasses.replace(config, trained_on="Fashion-MNIST")
    if data.startswith("imagefolder:"):
        return dataclasses.replace(config, trained_on=f"images of the folder {Path(data.split(':', 1)[1]).name}")
    return config


def from_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, ssd_backend: str = "auto") -> MatMambaVision:
    directory = Path(directory)
    config, meta = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    with torch.device("meta"), warnings.catch_warnings():  # no memory and no initialisation for weights that are
        # about to be replaced; torch's layer constructors still call their init, which warns on empty (head) weights
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        model = MatMambaVision(config, ssd_backend=ssd_backend, init_weights=False)
    state = load_file(str(weights))
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    model.meta = meta
    model.source_dir = directory
    return model.to(device=resolve_device(device), dtype=dtype).eval()


def weights_hash(directory: str | os.PathLike) -> str:
    """sha256 of the weights file: identifies the exact model an index was built with."""
    h = hashlib.sha256()
    with open(Path(directory) / WEIGHTS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shipped_path(name: str | os.PathLike) -> Path:
    """A model folder: `name` itself if it is a folder, else the shipped model of that name (a bare name)."""
    path = Path(name)
    if not path.exists() and len(path.parts) == 1 and (WEIGHTS_DIR / path).is_dir():
        return WEIGHTS_DIR / path
    return path


def load_model(path: str | os.PathLike | None = None, **kwargs) -> MatMambaVision:
    """The shipped default model (trained on Fashion-MNIST), a shipped model by name (e.g.
    "matmamba_vision_openclipart_ssl"), or the model saved in the folder `path`."""
    directory = shipped_path(path) if path is not None else DEFAULT_MODEL_DIR
    if not (directory / WEIGHTS_FILE).is_file():
        if path is None:
            raise FileNotFoundError(
                f"no shipped weights at {directory}: train them with `matsearch train` (see the README), "
                "or pass the folder of a saved model")
        raise FileNotFoundError(f"{directory} holds no {WEIGHTS_FILE}: not a saved MatMamba-Vision model folder")
    return from_pretrained(directory, **kwargs)
