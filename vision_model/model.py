"""MatMamba-Vision: a ViT-like stack of nested Mamba2 blocks with the CLS token as a suffix.

    model = create_model("matmamba_vision_fmnist")
    x = model.preprocess(pil_images)            # any size/mode -> the tensor the model was trained on
    logits = model(x, level=4)                  # D/4 in every layer
    emb = model.embed(x, widths=[192, 96, ...]) # Mix'n'Match: one width per layer; same space as every other width
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .ops.backends import current_fusions, resolve_backend
from .block import Block, make_norm
from .cache import DerivedTensorCache
from .config import MatMambaVisionConfig
from .ops.patchify import add_token_table_ref, add_token_table_triton, patchify_ref, patchify_triton


def _trunc_normal():
    """timm's truncated-normal initialiser, imported when weights are initialised (training), not when a saved
    model is loaded for a query: timm's import alone outlasts a query."""
    from timm.layers import trunc_normal_
    return trunc_normal_


class CosineClassifier(nn.Module):
    """Logits = scale * cos(x, w_c): the class decision depends on the embedding's direction only."""

    def __init__(self, in_features: int, num_classes: int, scale: float, init_weights: bool = True):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        if init_weights:
            _trunc_normal()(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


def conv_bn_gelu(in_chans: int, out_chans: int) -> nn.Sequential:
    """A stride-2 3x3 convolution (no bias), BatchNorm and GELU: one layer of the conv stem. Built from torch's
    layers under the names `conv` and `bn`, the parameter names of timm's ConvNormAct that saved models use, so
    that loading a model for a query does not import timm (whose import alone outlasts a query)."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(in_chans, out_chans, 3, stride=2, padding=1, bias=False),
                                     bn=nn.BatchNorm2d(out_chans), act=nn.GELU()))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> (b, tokens, d_model) row-major tokens: one strided convolution, `proj` (the
    parameter names of timm's PatchEmbed, which saved models use). The model itself computes it as one GEMM
    (`MatMambaVision._patch_tokens`); this forward is the plain convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _PermuteTokens(torch.autograd.Function):
    """tokens[:, order] for a permutation `order` of the token axis, backpropagated as the gather by its inverse:
    autograd's default for indexing zero-fills a gradient the size of the stream and scatter-adds into it."""

    @staticmethod
    def forward(ctx, tokens: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return tokens.index_select(1, order)

    @staticmethod
    def backward(ctx, grad: Tensor):
        inverse, = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


class MatMambaVision(DerivedTensorCache):
    def __init__(self, config: MatMambaVisionConfig, ssd_backend: str = "auto", init_weights: bool = True):
        """init_weights=False leaves the model's own initialisation out (the weights are about to be loaded)."""
        super().__init__()
        self.config = cfg = config
        self.ssd_backend = ssd_backend
        self._reorder_cache: dict = {}
        if cfg.stem == "conv":
            chans = (cfg.in_chans, *cfg.stem_channels)
            self.stem = nn.Sequential(
                *(conv_bn_gelu(cin, cout) for cin, cout in zip(chans, chans[1:])),
                nn.Conv2d(chans[-1], cfg.d_model, 1))
        else:
            self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.d_model, bias=cfg.patch_bias)
        # with cls_pos, the last row is the CLS token's position (the CLS token goes after the patches)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size ** 2 + cfg.cls_pos, cfg.d_model))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.inner_dim, cfg.d_state, cfg.d_conv, cfg.headdim, cfg.chunk_size, rate, cfg.norm_eps,
                  cfg.norm)
            for rate in rates)
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.head = (CosineClassifier(cfg.d_model, cfg.num_classes, cfg.head_scale, init_weights)
                     if cfg.head == "cosine" else nn.Linear(cfg.d_model, cfg.num_classes))
        if init_weights:
            self._init_weights()

    def _init_weights(self):
        trunc_normal_ = _trunc_normal()
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for blk in self.blocks:  # GPT-2 style: keep the residual stream's variance flat with depth
            blk.mixer.out_proj.weight.data /= (2 * self.config.depth) ** 0.5

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    # -- submodel selection -------------------------------------------------------------------------------------
    def widths(self, level: int | None = None, widths: Sequence[int] | None = None) -> tuple[int, ...]:
        return self.config.resolve_widths(level, widths)

    # -- forward ------------------------------------------------------------------------------------------------
    def _pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """(1, grid tokens, d_model): the patches' positional embedding, interpolated to another grid."""
        g = self.config.grid_size
        pos = self.pos_embed[:, :g * g]
        if grid == (g, g):
            return pos
        from timm.layers import resample_abs_pos_embed  # another resolution than the trained one: rare at query time
        return resample_abs_pos_embed(pos, new_size=list(grid), old_size=[g, g], num_prefix_tokens=0)

    def _cls_token(self) -> Tensor:
        """(1, 1, d_model): the CLS token with its positional row, if it has one."""
        return self.cls_token + self.pos_embed[:, -1:] if self.config.cls_pos else self.cls_token

    def _patch_tokens(self, x: Tensor) -> Tensor:
        """(b, c, H, W) -> (b, H/p * W/p, d_model), row-major patches: the conv stem, or the patch embedding's strided
        conv computed as one GEMM over unfolded patches (cuDNN runs that conv slowly in bf16; docs/notes.md, 6)."""
        if self.config.stem == "conv":
            if torch.is_grad_enabled() and current_fusions().stem_channels_last:
                # training: channels-last convolutions and BatchNorm (see `train_fusions`); the 1x1 projection's
                # channels-last output flattens into (b, tokens, d_model) rows without a copy
                x = x.contiguous(memory_format=torch.channels_last)
            return self.stem(x).flatten(2).transpose(1, 2)
        proj = self.patch_embed.proj
        patches = patchify_ref(x, self.config.patch_size)
        return F.linear(patches, proj.weight.reshape(proj.out_channels, -1), proj.bias)

    def embed(self, x: Tensor, level: int | None = None, widths: Sequence[int] | None = None,
              backend: str | None = None, tokens: Tensor | None = None) -> Tensor:
        """(b, c, h, w) images -> (b, d_model) final-norm CLS features (pool="avg": the mean of the final-norm patch
        tokens): the retrieval embedding. `tokens`, what `stem_tokens(x)` returned, skips the stem: a joint training
        step runs it once for all its levels."""
        self._check_images(x)
        inners = [self.config.inner_of(w) for w in self.widths(level, widths)]
        return self._embed_inners(x, inners, backend or self.ssd_backend, tokens)

    def stem_tokens(self, x: Tensor, backend: str | None = None) -> Tensor:
        """The width-independent start of `embed`: (b, tokens, d_model), the stem's patches and the CLS token."""
        self._check_images(x)
        return self._tokens(x, resolve_backend(backend or self.ssd_backend, x.device))

    def _check_images(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(f"expected images (b, {self.config.in_chans}, h, w), got {tuple(x.shape)}")
        p = self.config.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be a multiple of the patch size {p}")

    def _embed_inners(self, x: Tensor, inners: Sequence[int | None], backend: str,
                      tokens: Tensor | None = None) -> Tensor:
        """Embed with an explicit inner size per block (None: the block's own full size)."""
        p = self.config.patch_size
        if tokens is None:
            tokens = self._tokens(x, resolve_backend(backend, x.device))
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        reorders, inverses = self._reorders(grid, x.device), self._reorders(grid, x.device, inverse=True)
        gather = tokens.requires_grad and torch.is_grad_enabled() and current_fusions().reorder_gather
        for blk, inner, reorder, inverse in zip(self.blocks, inners, reorders, inverses):
            if reorder is not None:
                tokens = _PermuteTokens.apply(tokens, reorder, inverse) if gather else tokens[:, reorder]
            if self.training and torch.is_grad_enabled() and (self.config.drop_path_rate > 0
                                                               or current_fusions().block):
                tokens = blk(tokens, inner, backend)
            else:
                tokens = blk.forward_fused(tokens, inner, backend)
        if self.config.pool == "avg":
            return self.norm(tokens[:, :-1]).mean(1)
        return self.norm(tokens[:, -1])

    def _tokens(self, x: Tensor, backend: str = "torch") -> Tensor:
        """(b, c, H, W) -> (b, H/p * W/p + 1, d_model): patch tokens plus positional embedding, and the CLS token
        last (the scan is causal, so it goes last to see every patch)."""
        p = self.config.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        if self.config.stem == "conv":
            tokens = self._patch_tokens(x) + self._pos_embed(grid)
            return torch.cat([tokens, self._cls_token().expand(tokens.shape[0], -1, -1)], dim=1)
        # The patch GEMM writes the CLS row too (its patch is zero), then one in-place add puts in the positional
        # embedding, the patch bias and the CLS token: no concatenation pass over the tokens.
        b, c, H, W = x.shape
        proj = self.patch_embed.proj
        kernels = backend == "triton" and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, proj.weight, proj.bias, self.pos_embed, self.cls_token)))
        patches = x.new_empty(b, grid[0] * grid[1] + 1, c * p * p)
        if kernels and not p & (p - 1):
            patchify_triton(x, p, patches)
        else:
            patchify_ref(x, p, patches)
        patches[:, -1].zero_()
        tokens = F.linear(patches, proj.weight.reshape(proj.out_channels, -1))
        table = self._token_table(grid, x.dtype)
        if tokens.dtype != table.dtype:  # autocast: the stream keeps the input's dtype, as with the conv stem
            return tokens + table
        return (add_token_table_triton if kernels else add_token_table_ref)(tokens, table[0])

    def _token_table(self, grid: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """(1, tokens, d_model): what `_tokens` adds to the patch GEMM's output. Cached at inference (one per grid and
        dtype, rebuilt when a parameter changes): interpolating the positional embedding is a launch of its own."""
        bias = self.patch_embed.proj.bias
        params = (self.pos_embed, self.cls_token) + ((bias,) if bias is not None else ())

        def build():
            pos = self._pos_embed(grid)
            return torch.cat([pos if bias is None else pos + bias, self._cls_token()], dim=1).to(dtype)

        if torch.is_grad_enabled() and any(t.requires_grad for t in params):
            return build()
        return self.derived((grid, dtype, self.pos_embed.device), params, build)

    def _reorders(self, grid: tuple[int, int], device: torch.device, inverse: bool = False) -> list[Tensor | None]:
        """Per block, the gather that takes the tokens from the previous block's scan order into its own (None: same
        order); the CLS token stays last. With `inverse`, the gathers that undo them (their backward)."""
        key = (grid, device)
        if inverse:
            if (key, "inverse") not in self._reorder_cache:
                self._reorder_cache[key, "inverse"] = [None if r is None else torch.argsort(r)
                                                       for r in self._reorders(grid, device)]
            return self._reorder_cache[key, "inverse"]
        if key not in self._reorder_cache:
            rows, cols = grid
            index = torch.arange(rows * cols, device=device).reshape(rows, cols)
            orders = {"row": index.flatten(), "col": index.t().flatten()}
            orders.update({f"{name}_rev": order.flip(0) for name, order in list(orders.items())})
            cls = torch.tensor([rows * cols], device=device)
            current, out = torch.arange(rows * cols + 1, device=device), []
            for i in range(self.config.depth):
                wanted = torch.cat([orders[self.config.scan_orders[i % len(self.config.scan_orders)]], cls])
                # position in the current sequence of each token the next scan wants, in its order
                out.append(None if torch.equal(wanted, current) else torch.argsort(current)[wanted])
                current = wanted
            self._reorder_cache[key] = out
        return self._reorder_cache[key]

    def forward(self, x: Tensor, level: int | None = None, widths: Sequence[int] | None = None,
                backend: str | None = None, return_embedding: bool = False, tokens: Tensor | None = None):
        """Class logits; with return_embedding, (logits, embedding) from one pass (training uses both)."""
        emb = self.embed(x, level, widths, backend, tokens)
        return (self.head(emb), emb) if return_embedding else self.head(emb)

    def compile_training(self) -> None:
        """torch.compile the stem and every block's training forward in place (parameter names unchanged): it fuses
        the elementwise ops around the Triton kernels, which run as they are (graph breaks). One compiled graph per
        level and scan order; the cache limit is raised to hold them all."""
        import torch._dynamo
        limit = 8 * len(self.config.levels) * len(set(self.config.scan_orders))
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit,
                                                                 8 * limit)
        for module in [*self.blocks, *([self.stem] if self.config.stem == "conv" else [])]:
            module.compile()

    # -- submodels as standalone weights ------------------------------------------------------------------------
    def submodel_state_dict(self, level: int | None = None, widths: Sequence[int] | None = None) -> dict[str, Tensor]:
        """Every weight the submodel touches, sliced to the shapes of a standalone (non-nested) model."""
        inners = [self.config.inner_of(w) for w in self.widths(level, widths)]
        out = {k: v for k, v in self.state_dict().items() if not k.startswith("blocks.")}
        for i, (blk, inner) in enumerate(zip(self.blocks, inners)):
            for k, v in blk.norm.named_parameters():
                out[f"blocks.{i}.norm.{k}"] = v
            for k, v in blk.mixer.nested_weights(inner).items():
                out[f"blocks.{i}.mixer.{k}"] = v
        return {k: v.detach().clone() for k, v in out.items()}

    # -- preprocessing ------------------------------------------------------------------------------------------
    def preprocess(self, images: Image.Image | Sequence[Image.Image]) -> Tensor:
        """PIL images of any size and mode -> (b, in_chans, img_size, img_size) normalised float tensor
        (preprocess.to_model_input)."""
        from .preprocess import to_model_input
        return to_model_input(self.config, images)
