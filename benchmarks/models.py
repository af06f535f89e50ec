"""What the benchmark runs: model specs from the command line, the submodel settings of each, and their FLOPs.

A model spec is a MatMamba-Vision config name or a timm model name, optionally with overrides:
`matmamba_vision_35m:depth=2` or `vit_small_patch16_224:depth=2:embed_dim=64:num_heads=2` (tests, smoke runs).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Callable

import timm
import torch
import torch.nn as nn
from torch import Tensor

import vision_model
from vision_model import submodel_cost

# -- model specs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    overrides: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        """The spec as it was written: the model column of every output."""
        return ":".join([self.name] + [f"{k}={v}" for k, v in self.overrides])

    @property
    def is_matmamba(self) -> bool:
        return self.name in vision_model.CONFIGS


def _literal(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word, e.g. an activation name


def parse_model_spec(text: str) -> ModelSpec:
    name, *pairs = text.split(":")
    overrides = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"model override {pair!r} in {text!r} is not key=value")
        overrides.append((key, _literal(value)))
    return ModelSpec(name, tuple(overrides))


# -- settings: which submodel of a model a row measures ----------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    label: str  # "D", "D/4", "mnm-half"; "full" for models without nested widths
    level: int | None = None
    widths: tuple[int, ...] | None = None

    def embed_kwargs(self) -> dict:
        if self.widths is not None:
            return {"widths": list(self.widths)}
        return {} if self.level is None else {"level": self.level}


FULL = Setting("full")


def level_label(level: int) -> str:
    return "D" if level == 1 else f"D/{level}"


# Mix'n'Match presets built only from the trained levels' widths: then every layer has a head count the Triton
# kernels were already autotuned for at some level, and a preset adds no autotuning to the run.
def _mnm_half(cfg) -> tuple[int, ...]:
    """First half of the layers at D, the rest at D/2: about 3/4 of D's cost."""
    half = cfg.depth // 2
    return (cfg.d_model,) * half + (cfg.d_model // 2,) * (cfg.depth - half)


def _mnm_taper(cfg) -> tuple[int, ...]:
    """D, D/2, D/4, D/8 over four equal groups of layers: wide early, narrow late."""
    levels = cfg.levels
    return tuple(cfg.d_model // levels[i * len(levels) // cfg.depth] for i in range(cfg.depth))


MNM_PRESETS: dict[str, Callable] = {"mnm-half": _mnm_half, "mnm-taper": _mnm_taper}


def parse_setting_names(text: str) -> str | int:
    """One --levels item: a trained level (an int) or a Mix'n'Match preset name."""
    if text in MNM_PRESETS:
        return text
    if text.isdigit() and int(text) in vision_model.LEVELS:
        return int(text)
    raise ValueError(f"--levels takes trained levels {vision_model.LEVELS} or {sorted(MNM_PRESETS)}, got {text!r}")


def settings_for(model: nn.Module, names: list[str | int]) -> list[Setting]:
    """The settings a model runs: its levels and presets for MatMamba-Vision, one full model otherwise.
    Levels the config does not have (e.g. D/8 of a too-narrow test config) are skipped."""
    if not isinstance(model, vision_model.MatMambaVision):
        return [FULL]
    cfg = model.config
    out = []
    for name in names:
        if isinstance(name, int):
            if name in cfg.levels:
                out.append(Setting(level_label(name), level=name))
        else:
            out.append(Setting(name, widths=MNM_PRESETS[name](cfg)))
    return out


# -- building and calling -----------------------------------------------------------------------------------------


def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, ssd_backend: str = "auto") -> nn.Module:
    """One instance per model serves every resolution: both families interpolate the position embedding."""
    kwargs = dict(spec.overrides)
    if spec.is_matmamba:
        model = vision_model.create_model(spec.name, ssd_backend=ssd_backend, **kwargs)
    else:
        # num_classes=0: the pooled embedding, like MatMamba's embed(); random weights time the same
        model = timm.create_model(spec.name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
    return model.to(device=device, dtype=dtype).eval()


def encoder_call(model: nn.Module, setting: Setting) -> Callable[[Tensor], Tensor]:
    """images -> embeddings for one setting (the retrieval encoder, no classifier head)."""
    if isinstance(model, vision_model.MatMambaVision):
        kwargs = setting.embed_kwargs()
        return lambda x: model.embed(x, **kwargs)
    return model


def in_chans(model: nn.Module) -> int:
    if isinstance(model, vision_model.MatMambaVision):
        return model.config.in_chans
    return model.patch_embed.proj.in_channels


def patch_size(model: nn.Module) -> int:
    if isinstance(model, vision_model.MatMambaVision):
        return model.config.patch_size
    return model.patch_embed.patch_size[0]


# -- FLOPs --------------------------------------------------------------------------------------------------------


def vit_flops(num_patches: int, num_prefix_tokens: int, embed_dim: int, depth: int, mlp_hidden: int,
              in_chans: int, patch_size: int) -> int:
    """FLOPs (2 x multiply-accumulates) of one image through a ViT encoder, head excluded.

    With P patches, N = P + prefix tokens (CLS), width d, MLP hidden width h, patch size p and C channels:

        patch embed             2 * P * (C * p * p) * d
        per block, qkv          2 * N * d * 3d
                   attention    2 * 2 * N^2 * d          (Q K^T and softmax(.) V, over all heads together)
                   proj         2 * N * d * d
                   mlp          2 * N * d * h  +  2 * N * h * d

    Norms, softmax, GELU, biases and residual adds are element-wise and left out, as in the MatMamba cost model.
    """
    P, N, d, h = num_patches, num_patches + num_prefix_tokens, embed_dim, mlp_hidden
    patch_embed = 2 * P * in_chans * patch_size * patch_size * d
    per_block = 2 * N * d * 3 * d + 2 * 2 * N * N * d + 2 * N * d * d + 2 * 2 * N * d * h
    return patch_embed + depth * per_block


def _is_plain_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer
    return isinstance(model, VisionTransformer) and hasattr(model.blocks[0], "mlp")


def flops_per_image(model: nn.Module, setting: Setting, resolution: int) -> int | None:
    """Analytic FLOPs per square image of `resolution` px; None for a timm model the ViT formula does not describe."""
    if isinstance(model, vision_model.MatMambaVision):
        return submodel_cost(model.config, img_size=resolution, include_head=False, **setting.embed_kwargs()).flops
    if not _is_plain_vit(model):
        return None
    p = patch_size(model)
    return vit_flops(num_patches=(resolution // p) ** 2, num_prefix_tokens=model.num_prefix_tokens,
                     embed_dim=model.embed_dim, depth=len(model.blocks),
                     mlp_hidden=model.blocks[0].mlp.fc1.out_features, in_chans=in_chans(model), patch_size=p)
