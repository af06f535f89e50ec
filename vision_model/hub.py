"""Checkpoints: safetensors weights + a JSON config in one folder. Nothing is unpickled or executed on load."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import MatMambaVisionConfig
from .model import MatMambaVision

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
WEIGHTS_DIR = Path(__file__).parent / "weights"  # shipped model folders, each loadable by its folder name
DEFAULT_MODEL_DIR = WEIGHTS_DIR / "matmamba_vision_fmnist"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old file or the new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; these are ordinary shared artefacts
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(model: MatMambaVision, directory: str | os.PathLike, dtype: torch.dtype | None = torch.bfloat16,
                    extra: dict | None = None) -> Path:
    """Save weights (cast to `dtype`, None keeps them) and config; `extra` goes into config.json's "meta"."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{WEIGHTS_FILE}.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / WEIGHTS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    doc = {"config": model.config.to_dict(), "meta": extra or {}}
    if getattr(model, "arch", None):  # a distillation teacher: its network, on the encoder's data config
        doc["arch"] = model.arch
    atomic_write_bytes(directory / CONFIG_FILE, json.dumps(doc, indent=2).encode())
    return directory


def read_config(directory: str | os.PathLike) -> tuple[MatMambaVisionConfig, dict]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    doc = json.loads(path.read_text())
    if "arch" in doc:
        raise ValueError(f"{Path(directory)} holds a {doc['arch'].get('name')} distillation teacher, not a "
                         f"MatMamba-Vision encoder: pass it to `matsearch train --teacher`, or pick an encoder folder")
    return MatMambaVisionConfig.from_dict(doc["config"]), doc.get("meta", {})


def from_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, ssd_backend: str = "auto") -> MatMambaVision:
    directory = Path(directory)
    config, meta = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    model = MatMambaVision(config, ssd_backend=ssd_backend)
    state = load_file(str(weights))
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    model.meta = meta
    model.source_dir = directory
    return model.to(device=device, dtype=dtype).eval()


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
