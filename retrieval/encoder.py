"""Query encoding at any nested submodel: images in, L2-normalised float32 embeddings (and timings) out.

    encoder = QueryEncoder(vision_model.load_model())
    out = encoder.encode(pil_images, Submodel(level=4))
    out.embeddings            # (n, d_model) float32, unit rows: the same space the full-model index lives in
    out.timings               # {"decode": ms, "encode": ms}

Queries may be PIL images, encoded files (paths or bytes), uint8 arrays already at the model's size (e.g.
Fashion-MNIST), or float tensors the model's preprocessing already made.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vision_model.graphs import GraphedEmbed
from vision_model.images import UnreadableImage, decode_image
from vision_model.preprocess import decode_size, to_model_input

from .submodel import Submodel

QueryImage = Union[Image.Image, str, os.PathLike, bytes]
Queries = Union[QueryImage, Sequence[QueryImage], torch.Tensor, np.ndarray]


class UnreadableQuery(ValueError):
    """A query image that cannot be decoded; the message names it and says why."""


@dataclass
class EncodedQueries:
    embeddings: np.ndarray  # (n, d) float32, L2-normalised
    submodel: Submodel
    mflops: float  # per query (cost model)
    timings: dict[str, float]  # {"decode": ms, "encode": ms} for the whole batch


def load_query_image(source: QueryImage, max_pixels: int | None = None,
                     target_size: int | None = None) -> Image.Image:
    """A PIL image from a PIL image, a file path or encoded bytes (vision_model.images.decode_image: pass the
    model's img_size as `target_size` to decode as an index build does); UnreadableQuery says what is wrong."""
    if isinstance(source, Image.Image):
        return source
    name = "image bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        return decode_image(source, max_pixels, target_size)
    except UnreadableImage as e:
        raise UnreadableQuery(f"{name}: {e.reason}") from None


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


class QueryEncoder:
    def __init__(self, model, batch_size: int = 256):
        self.model = model.eval()
        self.batch_size = batch_size
        self._embed = GraphedEmbed(self.model)  # on CUDA, small batches replay captured graphs (launch-bound)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to_pixels(self, queries: Queries) -> torch.Tensor:
        """Any supported query form -> (n, c, h, w) float model input on the CPU."""
        if isinstance(queries, (np.ndarray, torch.Tensor)):
            # uint8 arrays are raw pixels (e.g. Fashion-MNIST); floats are preprocessed already
            return to_model_input(self.config, queries)
        if isinstance(queries, (Image.Image, str, os.PathLike, bytes, bytearray)):
            queries = [queries]
        if len(queries) == 0:
            raise ValueError("no query images given")
        size = decode_size(self.config)
        return to_model_input(self.config, [load_query_image(q, target_size=size) for q in queries])

    def embed(self, pixels: torch.Tensor, submodel: Submodel) -> np.ndarray:
        """Preprocessed pixels -> (n, d) float32 unit embeddings, in batches of `batch_size`."""
        widths = submodel.resolve(self.config)
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(pixels), self.batch_size):
                batch = pixels[start:start + self.batch_size].to(self.device)
                chunks.append(F.normalize(self._embed(batch, widths).float(), dim=-1).cpu().numpy())
        if not chunks:
            return np.zeros((0, self.config.d_model), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)

    def encode(self, queries: Queries, submodel: Submodel | int | str | None = None) -> EncodedQueries:
        submodel = Submodel.coerce(submodel)
        start = time.perf_counter()
        pixels = self.to_pixels(queries)
        decode_ms = _ms_since(start)
        start = time.perf_counter()
        embeddings = self.embed(pixels, submodel)
        encode_ms = _ms_since(start)
        return EncodedQueries(embeddings, submodel, submodel.mflops(self.config),
                              {"decode": decode_ms, "encode": encode_ms})
