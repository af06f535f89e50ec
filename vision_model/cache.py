"""Inference caches of tensors derived from a module's parameters (sliced nested weights, the token table)."""
from __future__ import annotations

from typing import Any, Callable, Hashable

import torch
import torch.nn as nn
from torch import Tensor


class DerivedTensorCache(nn.Module):
    """Base for modules that cache, at inference, values built from their parameters. An entry is rebuilt when a
    source tensor's version changes, and every entry is dropped on each train()/eval() switch and device or dtype
    move: fused optimizers update parameters without bumping their version counters (docs/notes.md, section 3)."""

    def __init__(self):
        super().__init__()
        self.clear_derived()

    def clear_derived(self) -> None:
        self._derived: dict[Hashable, tuple[tuple[int, ...], Any]] = {}

    def derived(self, key: Hashable, sources: tuple[Tensor, ...], build: Callable[[], Any]) -> Any:
        """build(), computed without autograd once per key and reused while no tensor in `sources` changes."""
        version = tuple(t._version for t in sources)
        hit = self._derived.get(key)
        if hit is None or hit[0] != version:
            with torch.no_grad():
                hit = self._derived[key] = (version, build())
        return hit[1]

    def _apply(self, fn, recurse=True):
        self.clear_derived()
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        self.clear_derived()
        return super().train(mode)
