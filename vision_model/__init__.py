"""MatMamba-Vision: nested (Matryoshka) Mamba2 vision encoders.

Names are imported on first use: a query process loads a saved model (hub -> model) without importing timm or
torchvision, whose imports cost more than the whole query. `vision_model.create_model` (module `registry`) also
registers the named configs with timm, so `timm.create_model("matmamba_vision_35m")` works once it, or
`vision_model.registry`, has been imported.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "CONFIGS": "config", "LEVELS": "config", "MatMambaVisionConfig": "config", "get_config": "config",
    "Cost": "cost", "submodel_cost": "cost",
    "DEFAULT_MODEL_DIR": "hub", "from_pretrained": "hub", "load_model": "hub", "save_pretrained": "hub",
    "weights_hash": "hub",
    "MatMambaVision": "model",
    "create_model": "registry",
}
__all__ = sorted(_EXPORTS)


# submodules that `vision_model.<name>` reaches without an import of its own (the package used to import them)
_SUBMODULES = ("config", "cost", "hub", "model", "registry", "block", "images", "preprocess")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
