"""timm registration: `timm.create_model("matmamba_vision_35m")` and friends."""
from __future__ import annotations

from timm.models import register_model

from .config import CONFIGS, get_config
from .model import MatMambaVision

_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only")


def create_model(name: str, pretrained: bool = False, ssd_backend: str = "auto", **overrides) -> MatMambaVision:
    """Build a named config, with any config field overridden (e.g. num_classes=10, img_size=384)."""
    if pretrained:
        from .hub import DEFAULT_MODEL_DIR, load_model
        if name != DEFAULT_MODEL_DIR.name or overrides:
            raise ValueError(f"pretrained weights ship only for {DEFAULT_MODEL_DIR.name} with its own config")
        return load_model(ssd_backend=ssd_backend)
    return MatMambaVision(get_config(name, **overrides), ssd_backend=ssd_backend)


def _timm_entry(name: str):
    def entry(pretrained: bool = False, **kwargs):
        for k in _TIMM_ONLY_KWARGS:
            kwargs.pop(k, None)
        return create_model(name, pretrained=pretrained, **kwargs)
    entry.__name__ = name
    entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"MatMamba-Vision config {name!r}."
    return entry


for _name in CONFIGS:
    globals()[_name] = register_model(_timm_entry(_name))
