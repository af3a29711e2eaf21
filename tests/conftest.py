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


def make_tiny_unet(channels: int = 1, num_classes: int = 4, sample_size: int = 8, seed: int = 0):
    """A ~5k-parameter class-conditional UNet2DModel with an attention block in each direction."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(4, 4),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=2,
        attention_head_dim=4,
        num_class_embeds=num_classes,
    )


def make_tiny_dit(channels: int = 1, num_classes: int = 4, sample_size: int = 8, seed: int = 0):
    """A ~3.7k-parameter class-conditional DiTTransformer2DModel (patch 2, one block), in eval mode: in train mode
    diffusers' DiT drops 10 % of the class labels at random (classifier-free guidance training)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=4,
        in_channels=channels,
        out_channels=channels,
        num_layers=1,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        norm_type="ada_norm_zero",
    ).eval()


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture(params=["unet", "dit"])
def tiny_denoiser(request):
    """The tiny UNet, then the tiny DiT: the library's math is backbone-agnostic."""
    return make_tiny_unet() if request.param == "unet" else make_tiny_dit()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test builds its own Accelerator (precision, accumulation): reset Accelerate's process-wide singletons
    after it, as Accelerate's own tests do."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
