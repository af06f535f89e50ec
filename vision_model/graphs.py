"""CUDA graphs for small-batch inference: capture a call once per input shape, replay it afterwards.

A batch-1 query through the 135M encoder launches hundreds of small kernels: eagerly the host's launches take far
longer than the GPU's work, a replayed graph launches them all at once (docs/notes.md).  `GraphedEmbed` keeps one graph per (shape, dtype, widths) and falls back
to the eager call where a graph cannot help or cannot be captured (CPU, autograd, large batches).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
from torch import Tensor


def capture_cuda_graph(fn: Callable[[Tensor], Any], example: Tensor, warmup: int = 2) -> Callable[[Tensor | None], Any]:
    """A replay function for fn captured on `example`'s shape: replay(x) copies x into the graph's input and
    returns the graph's output tensor (overwritten by the next replay); replay(None) reuses the last input.

    Warm-up calls run first on a side stream (PyTorch's recipe): Triton autotuning synchronises the device, which
    is illegal inside a capture."""
    static_x = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_x)

    def replay(x: Tensor | None = None):
        if x is not None:
            static_x.copy_(x)
        graph.replay()
        return static_out
    return replay


class GraphedEmbed:
    """model.embed(x, widths=...) through cached CUDA graphs, for a model whose weights no longer change.

    Graphs are kept for up to `max_graphs` (shape, dtype, widths) keys, least recently used dropped first; batches
    above `max_batch` run eagerly (launch overhead is already amortised there)."""

    def __init__(self, model, max_graphs: int = 8, max_batch: int = 32):
        self.model = model
        self.max_graphs, self.max_batch = max_graphs, max_batch
        self._graphs: OrderedDict[tuple, Callable | None] = OrderedDict()

    def _usable(self, x: Tensor) -> bool:
        return (x.device.type == "cuda" and x.shape[0] <= self.max_batch and not self.model.training
                and not torch.is_grad_enabled())

    def __call__(self, x: Tensor, widths: Sequence[int]) -> Tensor:
        widths = tuple(widths)
        if not self._usable(x):
            return self.model.embed(x, widths=widths)
        key = (tuple(x.shape), x.dtype, x.device, widths)
        if key not in self._graphs:
            try:
                self._graphs[key] = capture_cuda_graph(lambda t: self.model.embed(t, widths=widths), x)
            except Exception as exc:  # noqa: BLE001 - any capture failure: remember it and run eagerly
                warnings.warn(f"CUDA graph capture failed, running eagerly: {type(exc).__name__}: {exc}")
                torch.cuda.synchronize(x.device)
                self._graphs[key] = None
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        replay = self._graphs[key]
        return self.model.embed(x, widths=widths) if replay is None else replay(x).clone()
