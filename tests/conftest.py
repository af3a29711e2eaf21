"""Shared fixtures: tiny class-conditional UNets built from configs, and the real Fashion-MNIST location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(
            f"real Fashion-MNIST not found in {FASHION_MNIST_DIR}: `apt-get install dataset-fashion-mnist` "
            f"(setup.sh does this) or set FASHION_MNIST_DIR"
        )
    return FASHION_MNIST_DIR
