"""Image grids written as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io.files import atomic_path


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images in [0, 1] into one uint8 array (``H, W`` or ``H, W, 3``)."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for k in range(n):
        r, col = divmod(k, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = images[k]
    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8)
    if c == 1:
        return arr[0].numpy()
    return arr[:3].permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    """Save a grid of images to ``path`` (PNG), replacing it only once fully written."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(make_grid(images, nrow)).save(tmp, format="PNG")
