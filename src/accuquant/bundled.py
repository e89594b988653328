"""The bundled domain: MNIST diffusion models (``mnist-ddpm``, a class-conditional pixel
UNet, the default; ``mnist-sd``, a Stable Diffusion pipeline; ``mnist-dit``, a DiT
pipeline; ``mnist-sd3``, a Stable Diffusion 3 (MMDiT, flow matching) pipeline; ``mnist-flux``, a
FLUX.1 pipeline), the digit classifier, and the held-out digits that are the evaluation's
real-data reference.

All of it ships inside the package (``accuquant/assets``); nothing is read from outside.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import AccuQuantError

ASSETS = Path(__file__).parent / "assets"
#: the bundled models, chosen by name (``--model mnist-sd``); the first is the default
MODELS = ("mnist-ddpm", "mnist-sd", "mnist-dit", "mnist-sd3", "mnist-flux")
DEFAULT_MODEL = ASSETS / MODELS[0]
CLASSIFIER = ASSETS / "mnist-classifier"
HELDOUT = ASSETS / "mnist_heldout.safetensors"
BUNDLED_PREFIX = "bundled:"


def real_path(path) -> Path:
    """``path`` with its symbolic links resolved; a link loop is the user's error, not a crash."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):  # Python < 3.13 raises RuntimeError on a loop
        raise AccuQuantError(f"{path}: a loop of symbolic links") from None


def model_ref(path) -> str:
    """``bundled:<name>`` for a bundled model directory (valid wherever the package is
    installed), else the absolute path."""
    p = real_path(path)
    return BUNDLED_PREFIX + p.name if is_bundled(p) else str(p)


def is_bundled(path) -> bool:
    return real_path(path).parent == ASSETS.resolve()


def resolve_ref(ref: str) -> str:
    """The directory of ``bundled:<name>`` or of a bundled model's bare name (unless a local
    path has that name); any other reference unchanged."""
    if ref.startswith(BUNDLED_PREFIX):
        return str(ASSETS / ref[len(BUNDLED_PREFIX):])
    if ref in MODELS and not Path(ref).exists():
        return str(ASSETS / ref)
    return ref


def heldout() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,000 held-out digits as ``(N, 1, 28, 28)`` floats in [0, 1], and their labels."""
    t = load_file(str(HELDOUT))
    return t["images"].float().div(255).unsqueeze(1), t["labels"].long()
