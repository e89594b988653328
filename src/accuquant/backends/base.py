"""Backends: the modules that run frozen quantized layers.

Freezing describes each quantized layer as a :class:`LayerSpec`: its kind and conv or
linear hyper-parameters, integer weight codes with their step sizes and zero points (one
grid per part of a shortcut-split layer), the input's grid(s) and the bias. A backend
is a function from a spec to an ``nn.Module`` that computes the layer; backends are
registered by name (:func:`register_backend`) and chosen at freeze or load time.

``fake`` (the default) dequantizes the weight once, when it builds the module, and
fake-quantizes the input with the float arithmetic of calibration, so its outputs are
bit-identical to the calibrated model's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AccuQuantError
from ..quant.packing import pack_signed, unpack_signed
from ..quant.quantizers import grouped, int_range, round_ste, token_quant

KINDS = ("linear", "conv1d", "conv2d")


@dataclass
class Grid:
    """An affine integer grid: ``x = (q - zero_point) * scale`` for ``q`` in ``[qmin, qmax]``.

    ``scale`` and ``zero_point`` are 0-dim (per tensor) or broadcast to the quantized
    tensor (per output channel of a weight), or to its grouped view ``(O, K / group,
    group)`` (``group``: per group of inputs); zero points are integer-valued floats.
    ``per_token``: an input grid whose ranges are each token's own at run time, ``scale``
    their clipping factor (:func:`~accuquant.quant.quantizers.token_quant`).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    symmetric: bool
    group: int | None = None
    per_token: bool = False

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.symmetric)[1]


@dataclass
class LayerSpec:
    """A frozen quantized layer, as a backend needs it.

    Args:
        kind: ``"linear"``, ``"conv1d"`` or ``"conv2d"``.
        weight_codes: integer weight codes in ``[qmin, qmax]`` (int16, the weight's shape),
            or ``None`` when the weight stays in floating point (``weight``).
        weight_grids: the grid of each part of the weight (split at input channel ``split``).
        input_grids: the grid of each part of the input; empty: the input stays float.
        bias: the float bias, or ``None``.
        weight: the float weight, only when ``weight_codes`` is ``None``.
        split: input channel at which a concatenated input is split, or ``None``.
        stride, padding, dilation, groups, padding_mode: the conv's (unused for linear).
        outliers: the layer's smoothing, rotation and low-rank branch
            (:class:`~accuquant.quant.outliers.Outliers`), or ``None``: the weight codes are
            then those of the residual, which multiplies the transformed input.
    """

    kind: str
    weight_codes: torch.Tensor | None
    weight_grids: list[Grid]
    input_grids: list[Grid]
    bias: torch.Tensor | None
    weight: torch.Tensor | None = None
    split: int | None = None
    stride: tuple[int, ...] = (1,)
    padding: tuple[int, ...] | str = (0,)
    dilation: tuple[int, ...] = (1,)
    groups: int = 1
    padding_mode: str = "zeros"
    outliers: nn.Module | None = None

    @property
    def weight_bits(self) -> int | None:
        return max(g.bits for g in self.weight_grids) if self.weight_grids else None

    def parts(self, t: torch.Tensor, dim: int) -> list[torch.Tensor]:
        """``t`` cut at the split along ``dim`` (one part when not split)."""
        if self.split is None:
            return [t]
        return [t.narrow(dim, 0, self.split), t.narrow(dim, self.split, t.shape[dim] - self.split)]

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight: ``(q - z) * s`` per part, as calibration computes it."""
        if self.weight_codes is None:
            return self.weight
        return dequantize(self.weight_codes, self.weight_grids, self.split)


def dequantize(codes: torch.Tensor, grids: list[Grid], split: int | None) -> torch.Tensor:
    """``(q - z) * s`` of integer ``codes`` per part (cut at input channel ``split``)."""
    parts = [codes] if split is None else [codes[:, :split], codes[:, split:]]
    dev = codes.device  # (a kernel moved to another device keeps the grids it was built with)
    return torch.cat([((grouped(c, g.group).to(g.scale.dtype) - g.zero_point.to(dev)) * g.scale.to(dev))
                      .reshape(c.shape) for g, c in zip(grids, parts)], dim=1)


def recovered_codes(weight: torch.Tensor, grids: list[Grid], split: int | None) -> torch.Tensor:
    """The integer codes (int16) that :func:`dequantize` turned into ``weight``:
    ``round(w / s + z)``, exact while ``|q - z| * 2^-23`` stays far below one half."""
    parts = [weight] if split is None else [weight[:, :split], weight[:, split:]]
    dev = weight.device
    return torch.cat([(grouped(w, g.group) / g.scale.to(dev) + g.zero_point.to(dev)).round_().reshape(w.shape)
                      .to(torch.int16) for g, w in zip(grids, parts)], dim=1)


Builder = Callable[[LayerSpec], nn.Module]
BACKENDS: dict[str, Builder] = {}


#: per backend: the device type its kernels are for (``None``: any) and a function giving
#: why this machine cannot run them (``None``: it can)
NEEDS: dict[str, tuple[str | None, Callable[[], str | None]]] = {}


def register_backend(name: str, builder: Builder | None = None, device: str | None = None,
                     unavailable: Callable[[], str | None] = lambda: None):
    """Register ``builder`` (a :class:`LayerSpec` -> ``nn.Module`` function) as backend
    ``name``, for ``device`` (a device type, ``None``: any), runnable where
    ``unavailable()`` gives no reason; usable as a decorator."""
    def add(b: Builder) -> Builder:
        BACKENDS[name] = b
        NEEDS[name] = (device, unavailable)
        return b

    return add(builder) if builder is not None else add


def get_backend(name: str) -> Builder:
    if name not in BACKENDS:
        raise AccuQuantError(f"unknown backend {name!r}; choices: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]


def check_backend(name: str, device: str = "cpu") -> None:
    """Refuse, in one line, a backend that is unknown, for another device, or without its
    kernels here (what the command line checks before it loads a model)."""
    get_backend(name)
    want, unavailable = NEEDS[name]
    dev = torch.device(device).type
    if want is not None and want != dev:
        raise AccuQuantError(f"backend {name} runs on {want} (--device {want}); this run is on {dev}")
    why = unavailable()
    if why:
        raise AccuQuantError(f"backend {name} cannot run here: {why}")


def backends_for(device: str = "cpu") -> list[str]:
    """The backends this machine can run on ``device``, in registration order."""
    out = []
    for name in BACKENDS:
        try:
            check_backend(name, device)
        except AccuQuantError:
            continue
        out.append(name)
    return out


def build_layer(spec: LayerSpec, backend: str = "fake") -> nn.Module:
    """The module that runs ``spec`` on ``backend``."""
    return get_backend(backend)(spec)


# ---------------------------------------------------------------- fake backend
def fake_quant_(y: torch.Tensor, scale: float, lo: float, hi: float) -> torch.Tensor:
    """In place on ``y = x / s``: ``(clamp(round(y) + z, qmin, qmax) - z) * s``, given
    ``lo = qmin - z``, ``hi = qmax - z`` and ``scale = s`` (a float), in three passes
    instead of five (``y`` must not require grad).

    Bit-identical: ``z`` and ``round(y)`` are integers, so ``+ z`` and ``- z`` are exact
    inside the grid and moving them into the clamp bounds changes no value. They also
    turn ``round(y) = -0.0`` into ``+0.0``, and so does ``0 + s * y`` here, whose product
    is rounded once, as ``y * s`` is.
    """
    y.round_().clamp_(lo, hi)
    return torch.add(_ZERO.to(y.device), y, alpha=scale, out=y)


_ZERO = torch.zeros(())
_WORKSPACE = threading.local()


def _workspace(x: torch.Tensor, strides: tuple[int, ...] | None) -> torch.Tensor | None:
    """Room for the quantized input of ``x``'s shape with ``strides``, in one buffer shared by
    the fake layers of this thread, or ``None`` (layout not known yet, autograd on, not CPU).

    The quantized input only lives until the layer's matmul has read it, so one buffer
    serves every layer; reusing it spares the page faults of a fresh allocation per layer.
    """
    if strides is None or torch.is_grad_enabled() or x.device.type != "cpu":
        return None
    buf = getattr(_WORKSPACE, "buf", None)
    if (buf is None or buf.numel() < x.numel() or buf.dtype != x.dtype
            or buf.is_inference() != torch.is_inference_mode_enabled()):  # inference tensors stay in inference mode
        buf = _WORKSPACE.buf = torch.empty(x.numel(), dtype=x.dtype)
    return buf.as_strided(x.shape, strides)


class FakeQuantLayer(nn.Module):
    """A frozen layer computed in floating point: the weight dequantized once, the input
    fake-quantized per part. Its tensors are non-persistent buffers (they follow
    ``.to(device)``; the wrapping layer's state dict holds the rest). It holds the only copy
    of the weight (``holds_weights``): the codes come back from it exactly (:meth:`codes`),
    so a model on ``fake`` takes no more memory than its float32 base."""

    runs_on = "fake"
    holds_weights = True

    def __init__(self, spec: LayerSpec):
        super().__init__()
        if spec.kind not in KINDS:
            raise AccuQuantError(f"the fake backend has no {spec.kind!r} layer; it has {', '.join(KINDS)}")
        self.kind = spec.kind
        self.split = spec.split
        self.weight_grids = spec.weight_grids
        with torch.no_grad():
            self.register_buffer("weight", spec.dequantized_weight().detach(), persistent=False)
        self.weight_shape = tuple(self.weight.shape)
        # the codes must come back bit for bit (they always do for finite, normal step sizes)
        self.holds_weights = spec.weight_codes is not None and torch.equal(self.codes(),
                                                                           spec.weight_codes.to(torch.int16))
        self.register_buffer("bias", spec.bias.detach() if spec.bias is not None else None, persistent=False)
        for i, g in enumerate(spec.input_grids):
            if g.scale.numel() != 1:
                raise AccuQuantError("the fake backend quantizes inputs per tensor only")
            self.register_buffer(f"input_scale_{i}", g.scale.detach().reshape(()).clone(), persistent=False)
        # per input part: step size, zero point (an integer), qmin, qmax
        self.grids = [(g.scale.item(), g.zero_point.item(), g.qmin, g.qmax) for g in spec.input_grids]
        self.per_token = [(g.symmetric if g.per_token else None) for g in spec.input_grids]
        self.stride, self.padding, self.dilation, self.groups = spec.stride, spec.padding, spec.dilation, spec.groups
        self.padding_mode = spec.padding_mode
        self.outliers = None if spec.outliers is None else frozen_copy(spec.outliers)
        self.conv = {"conv1d": F.conv1d, "conv2d": F.conv2d}.get(spec.kind)
        self.layouts: dict[tuple, tuple[int, ...]] = {}  # input shape and strides -> strides of the quantized input
        if spec.padding_mode != "zeros":
            self.pad = _reversed_padding(spec.padding, spec.dilation, self.weight_shape[2:])

    def codes(self) -> torch.Tensor:
        """The weight's integer codes (int16)."""
        return recovered_codes(self.weight, self.weight_grids, self.split)

    def float_weight(self) -> torch.Tensor:
        return self.weight

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized per part, as calibration's input quantizers compute it."""
        if not self.grids:
            return x
        dim = -1 if self.kind == "linear" else 1
        sizes = (x.shape[dim],) if self.split is None else (self.split, x.shape[dim] - self.split)
        key = (x.shape, x.stride(), x.dtype)
        # no reused workspace under torch.compile: Inductor's freezing folds such a tensor as a constant
        reuse = not any(t is not None for t in self.per_token) and not torch.compiler.is_compiling()
        out = _workspace(x, self.layouts.get(key)) if reuse else None
        if out is None:
            # per part, then concatenated as calibration does: the result's memory format
            # (channels-last or not), which the conv's algorithm and rounding depend on, is
            # torch.cat's; it is remembered for the workspace
            parts = [self._quantize(p, i) for i, p in enumerate(x.split(sizes, dim))]
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
            self.layouts[key] = out.stride()
            return out
        for i, (p, o) in enumerate(zip(x.split(sizes, dim), out.split(sizes, dim))):
            self._quantize(p, i, o)
        return out

    def _quantize(self, p: torch.Tensor, i: int, out: torch.Tensor | None = None) -> torch.Tensor:
        s = getattr(self, f"input_scale_{i}")
        scale, z, qmin, qmax = self.grids[i]
        if self.per_token[i] is not None:  # each token's own range, as calibration's TokenQuantizer
            return token_quant(p, s, qmin, qmax, self.per_token[i], -1 if self.kind == "linear" else 1)
        if p.requires_grad and torch.is_grad_enabled():  # the quantizer's own arithmetic and gradient
            return (torch.clamp(round_ste(p / s) + z, qmin, qmax) - z) * s
        return fake_quant_(torch.div(p, s) if out is None else torch.div(p, s, out=out), scale, qmin - z, qmax - z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outliers is not None:  # as calibration's QuantLayer: the branch reads the transformed input
            x = self.outliers.input(x)
            y = self._forward(x)
            b = self.outliers.branch(x)
            return y if b is None else y + b
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self.quantize_input(x), self.float_weight()
        if self.conv is None:
            return F.linear(x, w, self.bias)
        if self.padding_mode != "zeros":
            x = F.pad(x, self.pad, mode=self.padding_mode)
            return self.conv(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return self.conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.kind}, weight={self.weight_shape}, split={self.split}, inputs={len(self.grids)}"


class PackedLayer(FakeQuantLayer):
    """The ``packed`` backend: the ``fake`` backend's arithmetic (bit-identical outputs) with
    the weight held as packed codes (:mod:`~accuquant.quant.packing`: two per byte at 4
    bits) and dequantized just in time, one layer at a time, on every call. For memory:
    a W4 model holds about an eighth of its float32 weights, at the cost of one pass over
    each weight per call."""

    runs_on = "packed"

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        if spec.weight_codes is None:
            return
        self.holds_weights = True
        self.bits, self.qmins = spec.weight_bits, [g.qmin for g in spec.weight_grids]
        self.register_buffer("packed_codes", pack_signed(spec.weight_codes, self.qmins, self.split, self.bits),
                             persistent=False)
        self.weight = None

    def codes(self) -> torch.Tensor:
        if self.weight is not None:
            return super().codes()
        return unpack_signed(self.packed_codes, self.qmins, self.split, self.bits, self.weight_shape)

    def float_weight(self) -> torch.Tensor:
        return self.weight if self.weight is not None else dequantize(self.codes(), self.weight_grids, self.split)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are non-persistent buffers: a kernel's own
    tensors, which follow ``.to(device)`` and stay out of the state dict (the wrapping
    layer's holds them)."""
    import copy

    out = copy.deepcopy(module)
    for m in out.modules():
        for name, p in list(m._parameters.items()):
            del m._parameters[name]
            m.register_buffer(name, None if p is None else p.detach().clone(), persistent=False)
    return out


def _reversed_padding(padding, dilation, kernel) -> list[int]:
    """``F.pad`` amounts for a conv's padding, as ``nn.Conv*`` computes them."""
    if padding == "valid":
        padding = (0,) * len(kernel)
    if padding == "same":
        out = []
        for d, k in zip(reversed(dilation), reversed(kernel)):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return out
    return [p for p in reversed(padding) for _ in range(2)]


#: the backends that compute what calibration computed, bit for bit
FAKE_ARITHMETIC = ("fake", "packed")

register_backend("fake", FakeQuantLayer)
register_backend("packed", PackedLayer)
