"""Real Fashion-MNIST test images for the model tests (the first 2,000 of the test split)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def fashion_mnist() -> torch.Tensor:
    """uint8 [2000, 1, 28, 28]. The IDX layout: 16-byte header, then rows of 28x28 bytes."""
    folder = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    path = folder / "t10k-images-idx3-ubyte.gz"
    if not path.exists():
        pytest.skip(f"Fashion-MNIST not found at {path} (make setup installs it)")
    with gzip.open(path, "rb") as f:
        data = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    return torch.from_numpy(data[: 2000 * 784].reshape(2000, 1, 28, 28).copy())
