"""Fixtures shared by several test files.

Triton decides when a kernel is defined (when `vision_model.ops` is first imported) whether it compiles it for a GPU or
runs it in its CPU interpreter. The suite runs on CPUs: TRITON_INTERPRET=1 is set here, before any test module imports
vision_model, so that tests/test_kernels.py can run every kernel on CPU tensors in this same process. Nothing else
changes: on CPU tensors the model takes the PyTorch path whatever the setting.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import vision_model  # noqa: E402
from vision_model.datasets import fashion_mnist_dir  # noqa: E402

needs_fashion_mnist = pytest.mark.skipif(not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                                         reason="Fashion-MNIST not installed (Debian package dataset-fashion-mnist)")


def save_small_model(directory: Path, seed: int, init_std: float | None = None,
                     dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """A small random Fashion-MNIST-shaped model (2 layers, d_model 64) saved as a model folder.
    `init_std` redraws every matrix from N(0, init_std): the default init maps all images to nearly one vector."""
    torch.manual_seed(seed)
    model = vision_model.create_model("matmamba_vision_fmnist", depth=2, d_model=64, d_state=16)
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.normal_(0, init_std)
    return vision_model.save_pretrained(model, directory, dtype=dtype)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine OpenMP threads competing with other
    processes made 2 ms calls take 200 ms. No timing is asserted where this is used."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
