"""MatMamba-Vision configuration: one dataclass, a few named presets."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Sequence

LEVELS = (1, 2, 4, 8)  # the trained granularities: width = d_model / level
SCAN_ORDERS = ("row", "row_rev", "col", "col_rev")


@dataclass(frozen=True)
class MatMambaVisionConfig:
    img_size: int = 224
    patch_size: int = 16
    # "patch": one linear projection per patch (ViT); "conv": log2(patch_size) overlapping 3x3 stride-2 convs
    # (BatchNorm, GELU) then a 1x1 projection: locality for small datasets, shared by every granularity
    stem: str = "patch"
    in_chans: int = 3
    num_classes: int = 1000
    d_model: int = 512
    depth: int = 20
    expand: int = 2
    d_inner: int | None = None  # default expand * d_model; set smaller for an independently trained small model
    d_state: int = 128
    d_conv: int = 4
    headdim: int = 16
    chunk_size: int = 256
    drop_path_rate: float = 0.0
    # the block pre-norms and the final norm: "rmsnorm" (weight only) or "layernorm" (weight and bias: the paper's)
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    # the positional embedding has a row for the CLS token (its last row: the CLS token goes after the patches), as
    # in the paper's models; without it the CLS token carries no position
    cls_pos: bool = False
    # the embedding (and the head's input): the final-norm CLS token ("cls") or the mean of the final-norm patch
    # tokens ("avg")
    pool: str = "cls"
    patch_bias: bool = True  # the patch embedding's projection has a bias
    # "linear": affine class logits; "cosine": head_scale * cos(embedding, class weight), which trains the
    # embedding's angles, the quantity cosine retrieval ranks by
    head: str = "linear"
    head_scale: float = 10.0
    # the order each block scans the patch grid in, cycled over the layers: "row" (row-major), "row_rev", "col"
    # (column-major), "col_rev"; the CLS token stays last in every order.  A causal scan shows each patch only the
    # patches before it; alternating orders let every patch see the whole image after a few blocks
    scan_orders: tuple[str, ...] = ("row",)
    # preprocessing: what the model was trained on
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop: str = "center"  # "center": resize the short side and crop; "pad": fit the long side and pad
    # with crop="center", the short side is resized to this before the img_size centre crop (ImageNet evaluation:
    # 256 for 224); None resizes it to img_size
    resize_size: int | None = None
    dark_background: bool = False  # trained on light-on-dark images: queries with a light border get inverted
    class_names: tuple[str, ...] = field(default_factory=tuple)
    name: str = "matmamba_vision"
    # the training data, in words (e.g. "Fashion-MNIST"); "" when unknown. Loading a model folder fills it in
    # from the training record when the folder's config.json predates the field (hub.from_pretrained)
    trained_on: str = ""

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")
        self.check_width(self.d_model)
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError("mean/std need one value per input channel")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {self.stem!r}")
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"stem='conv' halves the resolution per layer: patch_size must be a power of 2, "
                             f"got {self.patch_size}")
        if isinstance(self.scan_orders, list):  # from JSON (--set scan_orders='["row","col"]')
            object.__setattr__(self, "scan_orders", tuple(self.scan_orders))
        if not self.scan_orders or set(self.scan_orders) - set(SCAN_ORDERS) or isinstance(self.scan_orders, str):
            raise ValueError(f"scan_orders must be a non-empty sequence of {SCAN_ORDERS}, got {self.scan_orders!r}")
        if self.head not in ("linear", "cosine"):
            raise ValueError(f"head must be 'linear' or 'cosine', got {self.head!r}")
        if self.crop not in ("center", "pad"):
            raise ValueError(f"crop must be 'center' or 'pad', got {self.crop!r}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if self.pool not in ("cls", "avg"):
            raise ValueError(f"pool must be 'cls' or 'avg', got {self.pool!r}")
        if self.resize_size is not None and (self.crop != "center" or self.resize_size < self.img_size):
            raise ValueError(f"resize_size={self.resize_size} needs crop='center' and at least img_size={self.img_size}")

    @property
    def inner_dim(self) -> int:
        """Inner (expanded) dimension of a block at full width."""
        return self.d_inner if self.d_inner is not None else self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.inner_dim // self.headdim

    @property
    def stem_channels(self) -> tuple[int, ...]:
        """Output channels of the conv stem's stride-2 layers (empty for the patch stem)."""
        if self.stem != "conv":
            return ()
        n = self.patch_size.bit_length() - 1
        return tuple(max(self.d_model >> (n - i), 8) for i in range(n))

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    def _valid_width(self, width: int) -> bool:
        return 0 < width <= self.d_model and (width * self.inner_dim) % (self.d_model * self.headdim) == 0

    def inner_of(self, width: int) -> int:
        """Inner dimension a layer of `width` uses: the first inner_of(width) rows/heads are its share."""
        return width * self.inner_dim // self.d_model

    def check_width(self, width: int) -> int:
        if not isinstance(width, int) or isinstance(width, bool):
            raise TypeError(f"width must be an int, got {width!r}")
        if not self._valid_width(width):
            raise ValueError(
                f"width {width} is not a valid nested width for d_model={self.d_model}: it must be in "
                f"(0, {self.d_model}] and give a whole number of {self.headdim}-wide SSD heads")
        return width

    @property
    def levels(self) -> tuple[int, ...]:
        """The trained granularities this config supports."""
        return tuple(lv for lv in LEVELS if self.d_model % lv == 0 and self._valid_width(self.d_model // lv))

    def resolve_widths(self, level: int | None = None, widths: Sequence[int] | None = None) -> tuple[int, ...]:
        """Per-layer widths for a call: a trained `level` (D/level everywhere) or Mix'n'Match `widths`."""
        if level is not None and widths is not None:
            raise ValueError("pass either level or widths, not both")
        if widths is None:
            level = 1 if level is None else level
            if level not in self.levels:
                raise ValueError(f"level must be one of {self.levels}, got {level!r}")
            return (self.d_model // level,) * self.depth
        widths = tuple(widths)
        if len(widths) != self.depth:
            raise ValueError(f"widths needs one width per layer ({self.depth}), got {len(widths)}")
        return tuple(self.check_width(w) for w in widths)

    def describe_training(self) -> str:
        """What the model was trained on, in words: e.g. "28×28 grey Fashion-MNIST"."""
        kind = f"{self.img_size}×{self.img_size} {'grey' if self.in_chans == 1 else 'colour'}"
        return f"{kind} {self.trained_on}" if self.trained_on else kind

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MatMambaVisionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# The paper's architecture (ScaledFoundations/MatMamba, MatMamba2Vision): LayerNorm pre-norms and final norm, a
# positional row for the CLS token, mixer head dim d_model / 32, evaluated at 224 px centre-cropped from 256.
PAPER = dict(norm="layernorm", cls_pos=True, resize_size=256)

CONFIGS: dict[str, MatMambaVisionConfig] = {
    # the paper's ImageNet models, exactly: `matsearch model import` loads their released weights into these
    "matmamba_vision_35m": MatMambaVisionConfig(name="matmamba_vision_35m", d_model=512, depth=20, headdim=16, **PAPER),
    "matmamba_vision_135m": MatMambaVisionConfig(name="matmamba_vision_135m", d_model=1024, depth=20, headdim=32,
                                                 **PAPER),
    # not the paper's: for training from scratch.  headdim 64 (Mamba2's default) has the same parameters as 32 but half
    # the SSD heads and our one-kernel SSD forward (docs/notes.md, section 6); RMSNorm lets in_proj absorb the pre-norm
    "matmamba_vision_135m_fast": MatMambaVisionConfig(name="matmamba_vision_135m_fast", d_model=1024, depth=20,
                                                      headdim=64),
    # 28x28 grey Fashion-MNIST; trains in minutes on one GPU.  The conv stem beat the patch stem's test top-1 at
    # every width, most at D/8, in the same 60-epoch recipe (docs/notes.md, section 8)
    "matmamba_vision_fmnist": MatMambaVisionConfig(
        name="matmamba_vision_fmnist", img_size=28, patch_size=4, stem="conv", in_chans=1, num_classes=10,
        d_model=192, depth=8, expand=2, d_state=32, headdim=16, chunk_size=64, drop_path_rate=0.05,
        mean=(0.2860,), std=(0.3530,), crop="pad", dark_background=True, class_names=FASHION_MNIST_CLASSES),
    # colour clip art (openclipart-png), trained self-supervised in minutes of one GPU (docs/notes/ssl22.md): 96 px
    # keeps line art legible; the conv stem's four stride-2 layers (shared by every width) give each of the 6x6
    # tokens a convolutional receptive field, which small unlabelled datasets need, and keep the sequence short
    # enough for hundreds of epochs in the time box; 'pad' never cuts a drawing off. No class head: retrieval
    # uses the embedding.
    "matmamba_vision_clipart": MatMambaVisionConfig(
        name="matmamba_vision_clipart", img_size=96, patch_size=16, stem="conv", in_chans=3, num_classes=0,
        d_model=256, depth=8, expand=2, d_state=64, headdim=16, chunk_size=64,
        scan_orders=("row", "row_rev", "col", "col_rev"), crop="pad"),
}


def get_config(name: str, **overrides) -> MatMambaVisionConfig:
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; known: {sorted(CONFIGS)}")
    return dataclasses.replace(CONFIGS[name], **overrides)
