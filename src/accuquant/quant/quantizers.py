"""Uniform affine fake quantization with a straight-through estimator.

A :class:`UniformQuantizer` maps a float tensor onto the integer grid ``[qmin, qmax]``
and back: ``q = clamp(round(x / s) + z, qmin, qmax)``, ``x_hat = (q - z) * s``.

* symmetric: ``z = 0`` and the grid is ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, the same number
  of levels on both sides of zero (at 4 bits: -7..7);
* asymmetric: ``z`` is an integer in ``[0, 2^b - 1]`` and the grid is ``[0, 2^b - 1]``.

Rounding passes gradients straight through; the step size ``s`` is an ``nn.Parameter``
whose gradient is the LSQ one (it falls out of autograd through ``x / s`` and ``* s``).
Weights can switch to learned rounding (AdaRound): ``floor(x / s) + h(alpha)``. A weight
quantizer can also hold fixed integer codes (:meth:`UniformQuantizer.fix_codes`): then
``x_hat = (q - z) * s`` with ``q`` fixed and only ``s`` learnable, which keeps learned
rounding decisions when the step size moves (``floor(x / s)`` would jump by a whole step
for every weight that crosses a grid point).

Granularity: one step size per tensor, per slice along an axis (a weight's output
channels), or per group of ``group`` consecutive inputs of each output channel (a weight
of shape ``(O, ...)`` viewed as ``(O, K / group, group)``, ``K`` its inputs times its
kernel). :class:`TokenQuantizer` quantizes activations per token, with ranges taken from
each token at run time.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# AdaRound's rectified sigmoid stretch (Nagel et al., 2020).
_ZETA, _GAMMA = 1.1, -0.1


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _FromCodes(torch.autograd.Function):
    """``(codes - z) * s`` with the step size's gradient, keeping the integer codes (already
    held) for the backward pass instead of the float ``codes - z`` autograd would save: one
    weight-sized float tensor less per layer and forward pass in AccuQuant's steps."""

    @staticmethod
    def forward(ctx, codes, zero_point, s):
        ctx.save_for_backward(codes, zero_point, s)
        return (codes.to(s.dtype) - zero_point) * s

    @staticmethod
    def backward(ctx, grad):
        codes, zero_point, s = ctx.saved_tensors
        g = (grad * (codes.to(s.dtype) - zero_point)).sum_to_size(s.shape) if ctx.needs_input_grad[2] else None
        return None, None, g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (exactly ``torch.round``), with the identity as gradient."""
    return _RoundSTE.apply(x)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer grid of a ``bits``-bit quantizer."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def grouped(x: torch.Tensor, group: int | None) -> torch.Tensor:
    """``x`` (a weight, ``(O, ...)``) as ``(O, K / group, group)``; unchanged without a group."""
    return x if group is None else x.reshape(x.shape[0], -1, group)


def _reduce_dims(x: torch.Tensor, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(x.dim()))
    return tuple(d for d in range(x.dim()) if d != axis)


class UniformQuantizer(nn.Module):
    """Fake quantizer with one step size per tensor (``axis=None``) or per slice along ``axis``.

    Args:
        bits: bit width, 2 to 8.
        symmetric: symmetric signed grid (zero point 0) or affine unsigned grid.
        shape: shape of the step size and zero point, broadcastable to the quantized
            tensor: ``()`` per tensor, ``(C, 1, 1, 1)`` per output channel of a conv weight,
            ``(O, K / group, 1)`` per group.
        axis: the per-channel axis (``None`` per tensor).
        group: inputs per step size along each output channel (the tensor is seen as
            ``(O, K / group, group)``; ``axis`` is then 0, and the groups' axis too).
    """

    def __init__(self, bits: int, symmetric: bool, shape: tuple[int, ...] = (), axis: int | None = None,
                 group: int | None = None):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {bits}")
        self.bits = bits
        self.symmetric = symmetric
        self.axis = axis
        self.group = group
        self.qmin, self.qmax = int_range(bits, symmetric)
        self.scale = nn.Parameter(torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.alpha: nn.Parameter | None = None  # AdaRound variables, when learned rounding is on
        # fixed integer codes (int16, zero point included); a buffer, so it follows .to(device)
        self.register_buffer("codes", None, persistent=False)
        self.soft_rounding = True
        self.enabled = True
        self.observer: RangeObserver | None = None

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        gran = f"group={self.group}" if self.group else "tensor" if self.axis is None else f"axis={self.axis}"
        extra = ", adaround" if self.alpha is not None else (", fixed codes" if self.codes is not None else "")
        return f"bits={self.bits}, {kind}, {gran}" + extra

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x)
            return x
        if not self.enabled:
            return x
        if self.codes is not None:
            return self.from_int(self.codes)
        if self.group is not None:
            return self._quantize(grouped(x, self.group)).reshape(x.shape)
        return self._quantize(x)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale
        if not torch.is_grad_enabled() and self.alpha is None:
            # Inference: the same arithmetic as below, in place on one fresh tensor (3x faster).
            y = x / s
            y.round_().add_(self.zero_point).clamp_(self.qmin, self.qmax).sub_(self.zero_point)
            return y.mul_(s)
        if self.alpha is not None:
            x_int = torch.floor(x / s).detach() + self._rounding_offset()
        else:
            x_int = round_ste(x / s)
        q = torch.clamp(x_int + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * s

    def to_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes in ``[qmin, qmax]`` (int16), rounding as :meth:`forward` does (hard)."""
        with torch.no_grad():
            if self.codes is not None:
                return self.codes.clone()
            shape, x = x.shape, grouped(x, self.group)
            if self.alpha is not None:
                x_int = torch.floor(x / self.scale) + (self.alpha >= 0).to(x.dtype)
            else:
                x_int = torch.round(x / self.scale)
            return torch.clamp(x_int + self.zero_point, self.qmin, self.qmax).to(torch.int16).reshape(shape)

    def from_int(self, q: torch.Tensor) -> torch.Tensor:
        """Floats from integer codes: ``(q - z) * s`` (differentiable in ``s``)."""
        return _FromCodes.apply(grouped(q, self.group), self.zero_point, self.scale).reshape(q.shape)

    # ------------------------------------------------------------------ ranges
    @torch.no_grad()
    def set_range(self, xmin: torch.Tensor, xmax: torch.Tensor) -> None:
        """Set step size and zero point so that ``[xmin, xmax]`` spans the grid."""
        xmin = torch.minimum(xmin, torch.zeros_like(xmin))
        xmax = torch.maximum(xmax, torch.zeros_like(xmax))
        if self.symmetric:
            amax = torch.maximum(-xmin, xmax)
            scale = amax / self.qmax
            zp = torch.zeros_like(scale)
        else:
            scale = (xmax - xmin) / (self.qmax - self.qmin)
            scale = torch.clamp(scale, min=1e-8)
            zp = torch.clamp(torch.round(-xmin / scale), self.qmin, self.qmax)
        scale = torch.clamp(scale, min=1e-8)
        self.scale.data.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zp.reshape(self.zero_point.shape))

    @torch.no_grad()
    def init_range(self, x: torch.Tensor, method: str = "mse", percentile: float = 99.99, p: float = 2.0) -> None:
        """Initialise the range from data ``x`` by ``"minmax"``, ``"percentile"`` or ``"mse"`` (Lp) search."""
        x = grouped(x.detach().float(), self.group)
        dims = (2,) if self.group else _reduce_dims(x, self.axis)
        shape = self.scale.shape
        xmin = x.amin(dim=dims).reshape(shape) if dims else x.reshape(shape)
        xmax = x.amax(dim=dims).reshape(shape) if dims else x.reshape(shape)
        if method == "minmax":
            self.set_range(xmin, xmax)
        elif method == "percentile":
            if self.group:
                x = x.flatten(0, 1)  # each group a row, as a channel is
            flat = x if self.axis is None else x.movedim(self.axis, 0)
            flat = flat.reshape(-1) if self.axis is None else flat.reshape(flat.shape[0], -1)
            if flat.shape[-1] > 1 << 20:  # torch.quantile's size limit; a random subset is plenty
                g = torch.Generator(device=flat.device).manual_seed(0)
                flat = flat[..., torch.randint(0, flat.shape[-1], (1 << 20,), generator=g, device=flat.device)]
            q = percentile / 100.0
            lo = torch.quantile(flat, 1 - q, dim=-1) if self.axis is not None else torch.quantile(flat, 1 - q)
            hi = torch.quantile(flat, q, dim=-1) if self.axis is not None else torch.quantile(flat, q)
            self.set_range(lo.reshape(shape), hi.reshape(shape))
        elif method == "mse":
            self._search_lp(x, xmin, xmax, dims, p)
        else:
            raise ValueError(f"unknown range method {method!r}")

    @torch.no_grad()
    def _search_lp(self, x, xmin, xmax, dims, p: float, grid: int = 25) -> None:
        """Shrink ``[xmin, xmax]`` by a factor in [0.05, 1] and keep, per channel, the one with
        the lowest Lp error: a coarse grid of ``grid`` factors, then ``grid`` finer ones
        around the best."""
        best_err = torch.full(self.scale.shape, float("inf"), device=x.device)
        best_frac = torch.ones(self.scale.shape, device=x.device)
        step = 0.95 / (grid - 1)
        coarse = [1.0 - k * step for k in range(grid)]
        for frac in coarse:
            best_err, best_frac = self._try_fracs(x, xmin, xmax, dims, p, torch.full_like(best_frac, frac),
                                                  best_err, best_frac)
        center = best_frac.clone()
        for k in range(grid):
            frac = (center + (k / (grid - 1) * 2 - 1) * step).clamp(0.01, 1.0)
            best_err, best_frac = self._try_fracs(x, xmin, xmax, dims, p, frac, best_err, best_frac)
        self.set_range(xmin * best_frac, xmax * best_frac)

    def _try_fracs(self, x, xmin, xmax, dims, p, frac, best_err, best_frac):
        self.set_range(xmin * frac, xmax * frac)
        s, z = self.scale, self.zero_point
        x_hat = (torch.clamp(torch.round(x / s) + z, self.qmin, self.qmax) - z) * s
        err = (x_hat - x).abs().pow(p)
        err = err.mean(dim=dims).reshape(self.scale.shape) if dims else err.reshape(self.scale.shape)
        better = err < best_err
        return torch.where(better, err, best_err), torch.where(better, frac, best_frac)

    # ------------------------------------------------------------------ AdaRound
    def _rounding_offset(self) -> torch.Tensor:
        assert self.alpha is not None
        if self.soft_rounding:
            return torch.clamp(torch.sigmoid(self.alpha) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)
        return (self.alpha >= 0).to(self.scale.dtype)

    @torch.no_grad()
    def enable_learned_rounding(self, w: torch.Tensor) -> None:
        """Start AdaRound: rounding variables initialised so that ``h(alpha)`` equals the fractional part of ``w / s``."""
        w = grouped(w, self.group)
        rest = (w / self.scale) - torch.floor(w / self.scale)
        rest = rest.clamp(1e-4, 1 - 1e-4)
        alpha = -torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1)
        self.alpha = nn.Parameter(alpha)
        self.soft_rounding = True

    @torch.no_grad()
    def fix_codes(self, w: torch.Tensor) -> None:
        """Fix the integer codes of weight ``w`` as they are now (hard rounding, learned or
        nearest); from here on only the step size moves the quantized values."""
        self.codes = self.to_int(w)
        self.alpha = None

    def rounding_regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's ``sum(1 - |2 h(alpha) - 1|^beta)``, which pushes ``h`` to 0 or 1."""
        if self.alpha is None:
            return self.scale.new_zeros(())
        h = torch.clamp(torch.sigmoid(self.alpha) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)
        return (1 - (2 * h - 1).abs().pow(beta)).sum()


def token_quant(x: torch.Tensor, clip: torch.Tensor, qmin: int, qmax: int, symmetric: bool, dim: int) -> torch.Tensor:
    """``x`` fake-quantized per token: each slice along ``dim`` (a token's features; a conv
    input's channels at one pixel) gets the range ``[min, max]`` of its values (widened to
    include 0) times ``clip``, spread over ``[qmin, qmax]``. The ranges are taken without
    gradient; ``clip`` gets the step size's (LSQ) gradient. Calibration and the fake
    backend both call this, so their outputs are bit-identical."""
    with torch.no_grad():
        lo = x.detach().amin(dim, keepdim=True).clamp_(max=0)
        hi = x.detach().amax(dim, keepdim=True).clamp_(min=0)
    if symmetric:
        s = (torch.maximum(-lo, hi) * clip / qmax).clamp(min=1e-8)
        return torch.clamp(round_ste(x / s), qmin, qmax) * s
    s = ((hi - lo) * clip / (qmax - qmin)).clamp(min=1e-8)
    z = torch.round(-lo * clip.detach() / s.detach()).clamp_(qmin, qmax)
    return (torch.clamp(round_ste(x / s) + z, qmin, qmax) - z) * s


class TokenQuantizer(UniformQuantizer):
    """Dynamic per-token activation quantizer (``act_granularity="token"``): the step size of
    each token comes from its own range at run time (:func:`token_quant`); what is learned
    and saved is ``scale``, here a clipping factor of those ranges (1: min-max), one per
    quantizer. ``dim`` is the feature axis: -1 for a linear layer's input, 1 for a conv's."""

    def __init__(self, bits: int, symmetric: bool, dim: int = -1):
        super().__init__(bits, symmetric)
        self.dim = dim

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'sym' if self.symmetric else 'asym'}, per token (dim={self.dim})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None or not self.enabled:  # nothing to observe: ranges come at run time
            return x
        return token_quant(x, self.scale, self.qmin, self.qmax, self.symmetric, self.dim)

    def set_range(self, xmin, xmax) -> None:
        """Ranges are each token's own: the clipping factor stays as it is."""


def annealed_beta(frac: float, start: float = 20.0, end: float = 2.0) -> float:
    """AdaRound's regulariser exponent at fraction ``frac`` of the annealing: cosine from
    ``start`` to ``end`` (the cosine in float32, as the per-step method has always computed it)."""
    return end + 0.5 * (start - end) * (1 + torch.cos(torch.tensor(frac * math.pi))).item()


class RangeObserver:
    """Collects the range of a stream of activations, and a bounded random sample of its values.

    The exact min/max over everything seen is kept. The sample is a reservoir: each
    update contributes up to ``per_update`` values, each value gets a random key, and the
    ``max_values`` values with the smallest keys are kept, so early and late updates (early
    and late sampling steps) are represented alike. It feeds percentile and MSE range
    searches without storing every activation.
    """

    def __init__(self, max_values: int = 1 << 15, per_update: int = 1 << 13, seed: int = 0):
        self.min = math.inf
        self.max = -math.inf
        self.max_values = max_values
        self.per_update = per_update
        self.samples = torch.zeros(0)
        self.keys = torch.zeros(0)
        self.count = 0
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        self.min = min(self.min, x.min().item())
        self.max = max(self.max, x.max().item())
        x = x.cpu()
        if x.numel() > self.per_update:
            x = x[torch.randint(0, x.numel(), (self.per_update,), generator=self.gen)]
        self.samples = torch.cat([self.samples, x])
        self.keys = torch.cat([self.keys, torch.rand(x.numel(), generator=self.gen)])
        if self.samples.numel() > self.max_values:
            keep = torch.topk(self.keys, self.max_values, largest=False).indices
            self.samples, self.keys = self.samples[keep], self.keys[keep]
        self.count = self.samples.numel()

    def values(self) -> torch.Tensor:
        return self.samples if self.count else torch.zeros(1)

    @torch.no_grad()
    def apply(self, quantizer: UniformQuantizer, method: str, percentile: float = 99.99) -> None:
        """Set ``quantizer``'s range from what was observed."""
        if self.count == 0:
            return
        dev = quantizer.scale.device
        lo, hi = torch.tensor(self.min, device=dev), torch.tensor(self.max, device=dev)
        v = self.values().to(dev)
        if method == "minmax":
            quantizer.set_range(lo, hi)
        elif method == "percentile":
            q = percentile / 100.0
            quantizer.set_range(torch.quantile(v, 1 - q), torch.quantile(v, q))
        else:
            # Search on the sample, but always allow the exact observed extremes.
            quantizer._search_lp(torch.cat([v, lo[None], hi[None]]), lo, hi, dims=(0,), p=2.0)
