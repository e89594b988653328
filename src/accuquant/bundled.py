"""The bundled domain: a class-conditional MNIST diffusion model, its digit classifier,
and the held-out digits that are the evaluation's real-data reference.

All of it ships inside the package (``accuquant/assets``); nothing is read from outside.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "mnist-ddpm"
CLASSIFIER = ASSETS / "mnist-classifier"
HELDOUT = ASSETS / "mnist_heldout.safetensors"
BUNDLED_PREFIX = "bundled:"


def model_ref(path) -> str:
    """``bundled:<name>`` for a bundled model directory (valid wherever the package is
    installed), else the absolute path."""
    p = Path(path).resolve()
    if p.parent == ASSETS.resolve():
        return BUNDLED_PREFIX + p.name
    return str(p)


def resolve_ref(ref: str) -> str:
    if ref.startswith(BUNDLED_PREFIX):
        return str(ASSETS / ref[len(BUNDLED_PREFIX):])
    return ref


def heldout() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,000 held-out digits as ``(N, 1, 28, 28)`` floats in [0, 1], and their labels."""
    t = load_file(str(HELDOUT))
    return t["images"].float().div(255).unsqueeze(1), t["labels"].long()
