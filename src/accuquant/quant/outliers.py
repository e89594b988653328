"""Outlier handling of a quantized layer: smoothing, rotation and a low-rank branch.

4-bit activations fail on a few input channels whose values are much larger than the
rest. Three exact rewrites of ``y = x W^T`` move that range where quantization hurts less:

* **smooth** (SmoothQuant): ``x' = x / s``, ``W' = W diag(s)`` with one positive ``s`` per
  input channel, initialised to ``max|x_j|^a / max|W_j|^(1-a)`` (``a`` = 0.5);
* **rotate** (QuaRot-style): ``x' = x H``, ``W' = W H`` with ``H`` an orthonormal Hadamard
  matrix (block diagonal, blocks of the largest power of two, at most 256, that divides
  the inputs), which spreads an outlier channel over all channels of its block; folded into
  the layer producing the input where that is exact (an attention output projection's input
  comes from V: :func:`fold_rotations`), applied online elsewhere;
* **lowrank** (SVDQuant): ``W' = L + R`` with ``L = B A`` of rank ``r`` from the SVD of
  ``W'``, kept in floating point on the unquantized ``x'``; only ``R`` is quantized.

So ``y = Q(x') Q(R)^T + x' A^T B^T + bias``. Convolutions get smoothing and rotation over
their input channels (exact: the conv sums over them at every pixel, and zero padding
stays zero); the low-rank branch is for linear layers, and with ``conv_outliers`` for 1x1
convolutions of stride 1 without padding (a linear map over channels at every pixel), shortcut-split
ones included (smoothing and the branch, no rotation). The smoothing scales (as logs) and
the branch factors are parameters: methods learn them with the step sizes.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

#: the largest Hadamard block
MAX_BLOCK = 256


@functools.lru_cache(maxsize=None)
def hadamard(n: int) -> torch.Tensor:
    """The ``n x n`` Sylvester Hadamard matrix divided by ``sqrt(n)`` (orthonormal and
    symmetric; ``n`` a power of two). Cached, and made outside inference mode so that a
    graph may keep it."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard matrix needs a power of two, not {n}")
    with torch.inference_mode(False):
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return (h / math.sqrt(n)).float()


def rotate(t: torch.Tensor, dim: int, block: int) -> torch.Tensor:
    """``t`` times the block-diagonal orthonormal Hadamard matrix (blocks of ``block``) along ``dim``."""
    t = t.movedim(dim, -1)
    shape = t.shape
    t = (t.reshape(*shape[:-1], -1, block) @ hadamard(block).to(t)).reshape(shape)
    return t.movedim(-1, dim)


def rotation_block(n: int) -> int | None:
    """The Hadamard block of ``n`` inputs: the largest power of two up to :data:`MAX_BLOCK`
    dividing ``n``, or ``None`` below 8 (too small to spread an outlier)."""
    b = min(n & -n, MAX_BLOCK)
    return b if b >= 8 else None


class Outliers(nn.Module):
    """The outlier transforms of one layer with ``in_features`` inputs and ``out_features``
    outputs (``kinds``: a subset of ``smooth``, ``rotate``, ``lowrank``).

    Args:
        rank: the low-rank branch's rank (capped by the weight's shape).
        channel_dim: where the input's channels are: -1 (linear) or 1 (conv).
        branch: whether the layer can take the branch: a linear layer, or a 1x1 convolution
            with stride 1 and no padding (a linear map over channels, pixel by pixel).
    """

    def __init__(self, kinds: tuple[str, ...], in_features: int, out_features: int, rank: int, channel_dim: int,
                 branch: bool):
        super().__init__()
        self.kinds = tuple(kinds)
        self.channel_dim = channel_dim
        self.log_smooth = nn.Parameter(torch.zeros(in_features)) if "smooth" in kinds else None
        self.block = rotation_block(in_features) if "rotate" in kinds else None
        #: the input arrives rotated (the rotation is folded into the layer producing it): it is
        #: rotated, then smoothed, and the weight likewise
        self.folded = False
        r = min(rank, in_features, out_features) if "lowrank" in kinds and branch else 0
        self.lora_a = nn.Parameter(torch.zeros(r, in_features)) if r else None
        self.lora_b = nn.Parameter(torch.zeros(out_features, r)) if r else None

    def extra_repr(self) -> str:
        parts = (["smooth"] if self.log_smooth is not None else []) + (
            [f"rotate (blocks of {self.block}{', folded' if self.folded else ''})"] if self.block else []) + (
            [f"lowrank (rank {self.lora_a.shape[0]})"] if self.lora_a is not None else [])
        return ", ".join(parts) or "none applies"

    @property
    def active(self) -> bool:
        return self.log_smooth is not None or self.block is not None or self.lora_a is not None

    def parameters_to_learn(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in (("log_smooth", self.log_smooth), ("lora_a", self.lora_a),
                                  ("lora_b", self.lora_b)) if p is not None}

    def fold(self, block: int) -> None:
        """Take the input already rotated, in blocks of ``block`` (see :attr:`folded`)."""
        self.block, self.folded = block, True

    # ------------------------------------------------------------------ the rewrites
    def _rotate(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return rotate(t, dim, self.block)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """``x'``: the input as the quantized weight sees it (a folded rotation: already done)."""
        d = self.channel_dim
        if self.log_smooth is not None:
            s = torch.exp(self.log_smooth)
            x = x / (s if d == -1 else s.reshape(-1, *([1] * (x.dim() - 2))))
        if self.block is not None and not self.folded:
            x = self._rotate(x, d)
        return x

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """``W'`` before the branch is taken off: smoothed, then rotated along the inputs (a
        folded rotation: rotated, then smoothed, as the input arrives)."""
        if self.block is not None and self.folded:
            w = self._rotate(w, 1)
        if self.log_smooth is not None:
            w = w * torch.exp(self.log_smooth).reshape(1, -1, *([1] * (w.dim() - 2)))
        if self.block is not None and not self.folded:
            w = self._rotate(w, 1)
        return w

    def residual(self, w: torch.Tensor) -> torch.Tensor:
        """``R = W' - B A``: what is quantized."""
        w = self.weight(w)
        return w if self.lora_a is None else w - (self.lora_b @ self.lora_a).reshape(w.shape)

    def branch(self, x_prime: torch.Tensor) -> torch.Tensor | None:
        """``x' A^T B^T``, or ``None`` without a branch."""
        if self.lora_a is None:
            return None
        x = x_prime if self.channel_dim == -1 else x_prime.movedim(1, -1)
        y = (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype)
        return y if self.channel_dim == -1 else y.movedim(-1, 1)

    # ------------------------------------------------------------------ closed-form start
    @torch.no_grad()
    def initialise(self, w: torch.Tensor, act_absmax: torch.Tensor | None, alpha: float = 0.5) -> None:
        """SmoothQuant's scales from the inputs' per-channel ``act_absmax`` (and the weight's),
        then the branch from the SVD of the smoothed, rotated weight."""
        if self.log_smooth is not None and act_absmax is not None:
            w_in = (self._rotate(w, 1) if self.folded else w).abs().transpose(0, 1)
            w_max = w_in.reshape(w.shape[1], -1).amax(1).clamp(min=1e-5)
            a_max = act_absmax.to(w.device).float().clamp(min=1e-5)
            self.log_smooth.copy_(alpha * a_max.log() - (1 - alpha) * w_max.log())
        if self.lora_a is not None:
            u, sv, vh = torch.linalg.svd(self.weight(w).reshape(w.shape[0], -1).double(), full_matrices=False)
            r = self.lora_a.shape[0]
            root = sv[:r].sqrt()
            self.lora_b.copy_((u[:, :r] * root).float())
            self.lora_a.copy_((root[:, None] * vh[:r]).float())


#: attention processors whose output is, per head, a mixture over tokens of V: rotating V's
#: channels within each head rotates the output the same way
V_LINEAR_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "QuantAttnProcessor", "JointAttnProcessor2_0",
                       "QuantJointAttnProcessor", "FluxAttnProcessor", "QuantFluxAttnProcessor")


def fold_rotations(model: nn.Module, only: set[str] | None = None) -> dict[str, list[str]]:
    """Fold the input rotation of each attention output projection (of those in ``only``, if
    given) into the V projections feeding it, where that is exact; return ``{consumer: producers}``.

    The output projection reads ``P V`` per head (``P`` mixes tokens), so ``V H`` with ``H``
    block-diagonal inside each head gives ``P V H``: the rotation moves into V's weight and
    bias (where it is quantized with them) and the projection skips its online rotation. Its
    block shrinks to fit a head where needed. Every other rotated layer (after a norm, an
    activation function or a residual sum, where no linear map precedes it) rotates online.
    The layers are wrapped ones (:class:`~accuquant.quant.layers.QuantLayer`)."""
    folded: dict[str, list[str]] = {}
    for name, attn in model.named_modules():
        if type(getattr(attn, "processor", None)).__name__ not in V_LINEAR_PROCESSORS or not hasattr(attn, "to_v"):
            continue
        outs = [(f"{name}.to_out.0", attn.to_out[0] if isinstance(getattr(attn, "to_out", None), nn.ModuleList)
                 else None), (f"{name}.to_add_out", getattr(attn, "to_add_out", None))]
        outs = [(n, m) for n, m in outs if m is not None]
        if only is not None and not any(n in only for n, _ in outs):
            continue
        ins = [(f"{name}.{k}", getattr(attn, k, None)) for k in ("to_v", "add_v_proj")]
        ins = [(n, m) for n, m in ins if m is not None]
        if not outs or any(not hasattr(m, "out_block") or not isinstance(m.module, nn.Linear) for _, m in ins + outs):
            continue
        if any(m.outliers is None or m.outliers.block is None for _, m in outs):
            continue
        head_dim = ins[0][1].out_features // attn.heads
        block = min([head_dim & -head_dim] + [m.outliers.block for _, m in outs])
        if block < 8 or any(m.out_features != ins[0][1].out_features for _, m in ins):
            continue
        for _, m in outs:
            m.outliers.fold(block)
        for _, m in ins:
            m.out_block = block
        folded.update({n: [i for i, _ in ins] for n, _ in outs})
    return folded
