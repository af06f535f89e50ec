"""Building and storing FAISS indexes of full-model embeddings, with their metadata.

    from index import build_index, IndexStore
    build_index("fashion-mnist:test", "indexes/fmnist-test", model_dir="path/to/model")
    store = IndexStore.open("indexes/fmnist-test")
    scores, ids = store.search(queries, k=10)      # queries: (n, d) float32, L2-normalised
    rows = store.metadata(ids[0])                  # key, label, label_name, sha256, width, height, source
    labels = store.labels                          # label id per item (-1: unlabelled); retrieval.knn.labels_of

Names are imported on first use, so that reading an index does not import torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "build_index": "build", "BuildResult": "build",
    "IndexStore": "store", "CorruptIndexError": "store",
    "choose_index": "index_types", "IndexChoice": "index_types",
    "open_source": "sources", "ImageSource": "sources", "SourceItem": "sources", "UnreadableImage": "sources",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
