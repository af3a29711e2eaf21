"""Images and figures written as PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1) -> np.ndarray:
    """float ``[N, C, H, W]`` in ``[-1, 1]`` -> uint8 ``[rows*(H+p)+p, nrow*(W+p)+p, 3]`` grid on a white border."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top : top + h, left : left + w] = images[i].permute(1, 2, 0).numpy()
    return grid


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 4) -> None:
    """Write ``image_grid(images, nrow)`` as a PNG, upscaled ``scale`` times (nearest) so small images stay visible."""
    from PIL import Image

    grid = Image.fromarray(image_grid(images, nrow))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
