"""Outlier handling of a quantized layer: smoothing, rotation and a low-rank branch.

4-bit activations fail on a few input channels whose values are much larger than the
rest. Three exact rewrites of ``y = x W^T`` move that range where quantization hurts less:

* **smooth** (SmoothQuant): ``x' = x / s``, ``W' = W diag(s)`` with one positive ``s`` per
  input channel, initialised to ``max|x_j|^a / max|W_j|^(1-a)`` (``a`` = 0.5);
* **rotate** (QuaRot-style): ``x' = x H``, ``W' = W H`` with ``H`` an orthonormal Hadamard
  matrix (block diagonal, blocks of the largest power of two, at most 256, that divides
  the inputs), which spreads an outlier channel over all channels of its block; applied
  online (this implementation folds nothing into the previous layer);
* **lowrank** (SVDQuant): ``W' = L + R`` with ``L = B A`` of rank ``r`` from the SVD of
  ``W'``, kept in floating point on the unquantized ``x'``; only ``R`` is quantized.

So ``y = Q(x') Q(R)^T + x' A^T B^T + bias``. Convolutions get smoothing and rotation over
their input channels (exact: the conv sums over them at every pixel, and zero padding
stays zero); the low-rank branch is for linear layers. The smoothing scales (as logs) and
the branch factors are parameters: methods learn them with the step sizes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: the largest Hadamard block
MAX_BLOCK = 256


def hadamard(n: int) -> torch.Tensor:
    """The ``n x n`` Sylvester Hadamard matrix divided by ``sqrt(n)`` (orthonormal and
    symmetric; ``n`` a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard matrix needs a power of two, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).float()


def rotation_block(n: int) -> int | None:
    """The Hadamard block of ``n`` inputs: the largest power of two up to :data:`MAX_BLOCK`
    dividing ``n``, or ``None`` below 8 (too small to spread an outlier)."""
    b = min(n & -n, MAX_BLOCK)
    return b if b >= 8 else None


class Outliers(nn.Module):
    """The outlier transforms of one layer with ``in_features`` inputs and ``out_features``
    outputs (``kinds``: a subset of ``smooth``, ``rotate``, ``lowrank``).

    Args:
        rank: the low-rank branch's rank (linear layers only; capped by the weight's shape).
        channel_dim: where the input's channels are: -1 (linear) or 1 (conv).
    """

    def __init__(self, kinds: tuple[str, ...], in_features: int, out_features: int, rank: int, channel_dim: int):
        super().__init__()
        self.kinds = tuple(kinds)
        self.channel_dim = channel_dim
        self.log_smooth = nn.Parameter(torch.zeros(in_features)) if "smooth" in kinds else None
        self.block = rotation_block(in_features) if "rotate" in kinds else None
        self.register_buffer("hadamard", None if self.block is None else hadamard(self.block), persistent=False)
        r = min(rank, in_features, out_features) if "lowrank" in kinds and channel_dim == -1 else 0
        self.lora_a = nn.Parameter(torch.zeros(r, in_features)) if r else None
        self.lora_b = nn.Parameter(torch.zeros(out_features, r)) if r else None

    def extra_repr(self) -> str:
        parts = (["smooth"] if self.log_smooth is not None else []) + (
            [f"rotate (blocks of {self.block})"] if self.block else []) + (
            [f"lowrank (rank {self.lora_a.shape[0]})"] if self.lora_a is not None else [])
        return ", ".join(parts) or "none applies"

    @property
    def active(self) -> bool:
        return self.log_smooth is not None or self.block is not None or self.lora_a is not None

    def parameters_to_learn(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in (("log_smooth", self.log_smooth), ("lora_a", self.lora_a),
                                  ("lora_b", self.lora_b)) if p is not None}

    # ------------------------------------------------------------------ the rewrites
    def _rotate(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """``t`` times the block-diagonal Hadamard matrix along ``dim``."""
        t = t.movedim(dim, -1)
        shape = t.shape
        t = (t.reshape(*shape[:-1], -1, self.block) @ self.hadamard.to(t.dtype)).reshape(shape)
        return t.movedim(-1, dim)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """``x'``: the input as the quantized weight sees it."""
        d = self.channel_dim
        if self.log_smooth is not None:
            s = torch.exp(self.log_smooth)
            x = x / (s if d == -1 else s.reshape(-1, *([1] * (x.dim() - 2))))
        if self.block is not None:
            x = self._rotate(x, d)
        return x

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """``W'`` before the branch is taken off (smoothed, rotated along the inputs)."""
        if self.log_smooth is not None:
            w = w * torch.exp(self.log_smooth).reshape(1, -1, *([1] * (w.dim() - 2)))
        if self.block is not None:
            w = self._rotate(w, 1)
        return w

    def residual(self, w: torch.Tensor) -> torch.Tensor:
        """``R = W' - B A``: what is quantized."""
        w = self.weight(w)
        return w if self.lora_a is None else w - self.lora_b @ self.lora_a

    def branch(self, x_prime: torch.Tensor) -> torch.Tensor | None:
        """``x' A^T B^T``, or ``None`` without a branch."""
        if self.lora_a is None:
            return None
        return (x_prime @ self.lora_a.t().to(x_prime.dtype)) @ self.lora_b.t().to(x_prime.dtype)

    # ------------------------------------------------------------------ closed-form start
    @torch.no_grad()
    def initialise(self, w: torch.Tensor, act_absmax: torch.Tensor | None, alpha: float = 0.5) -> None:
        """SmoothQuant's scales from the inputs' per-channel ``act_absmax`` (and the weight's),
        then the branch from the SVD of the smoothed, rotated weight."""
        if self.log_smooth is not None and act_absmax is not None:
            w_max = w.abs().transpose(0, 1).reshape(w.shape[1], -1).amax(1).clamp(min=1e-5)
            a_max = act_absmax.to(w.device).float().clamp(min=1e-5)
            self.log_smooth.copy_(alpha * a_max.log() - (1 - alpha) * w_max.log())
        if self.lora_a is not None:
            u, sv, vh = torch.linalg.svd(self.weight(w).double(), full_matrices=False)
            r = self.lora_a.shape[0]
            root = sv[:r].sqrt()
            self.lora_b.copy_((u[:, :r] * root).float())
            self.lora_a.copy_((root[:, None] * vh[:r]).float())
