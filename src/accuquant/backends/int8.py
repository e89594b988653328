"""The ``int8`` backend: frozen layers run on oneDNN's integer kernels on the CPU.

A layer's input is quantized to the calibrated codes (the same rounding as the ``fake``
backend), shifted into uint8 with its zero point; the weight's codes, minus their zero
points, are an int8 tensor prepacked once with a float step size per output channel. The
kernel sums ``(qx - zx) * qw`` in int32 and scales the result, so the output is the
fake backend's up to float rounding (tested to a relative error of 1e-5).

CPUs without VNNI instructions (AVX2 only) multiply uint8 by int8 in pairs summed in
int16, which saturates unless ``|qw| <= 64``; there, weights whose codes leave that range
(8-bit weights) stay on ``fake``. A layer the kernels cannot run (activations above 8
bits or not quantized, float weights, 1-D convs, a padding mode other than zeros, another
device) also stays on ``fake``; :func:`accuquant.backends.placement.placement` says which layers run
where, and why. The quantized attention processors follow the backend: on ``int8`` their
``softmax . V`` runs on the same kernels (see :meth:`QuantAttnProcessor._attend_int8`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .base import FakeQuantLayer, LayerSpec, register_backend


#: the layer kinds the integer backends (this one and ``cuda-int8``) run on integer kernels
INTEGER_KINDS = ("linear", "conv2d")

class Unsupported(Exception):
    """Why a layer cannot run on the int8 kernels."""


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((ln for ln in f if ln.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def vnni() -> bool:
    """Whether this CPU multiplies uint8 by int8 without int16 saturation (VNNI or AMX)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise") \
        and torch.backends.mkldnn.is_available()


def _input_grid(g) -> tuple[float, int, int, int]:
    """``(scale, zero point in uint8, lo, hi)``: a grid of at most 8 bits shifted into 0..255."""
    if g.bits > 8:
        raise Unsupported(f"{g.bits}-bit activations (the kernels take 8 at most)")
    if g.scale.numel() != 1:
        raise Unsupported("per-channel activation step sizes")
    shift = 0 if g.qmin >= 0 else 128
    lo, hi, z = g.qmin + shift, g.qmax + shift, int(g.zero_point.item()) + shift
    if lo < 0 or hi > 255:
        raise Unsupported("an activation grid wider than uint8")
    return g.scale.item(), z, lo, hi


def centred_weights(spec: LayerSpec, limit: int = 127) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per part of the weight: ``(q - z`` as int8, the step size per output channel``)``,
    refused where ``|q - z|`` exceeds ``limit`` (asymmetric 8-bit weights: beyond int8)."""
    out = []
    for g, c in zip(spec.weight_grids, spec.parts(spec.weight_codes, 1)):
        zp = g.zero_point.reshape(-1, *([1] * (c.dim() - 1))) if g.zero_point.numel() > 1 else g.zero_point
        q = c.to(torch.int32) - zp.to(torch.int32)
        if q.abs().max().item() > limit:
            raise Unsupported(f"weight codes up to {q.abs().max().item()} in magnitude (this CPU's kernels "
                              f"are exact up to {limit}: without VNNI, uint8 x int8 pairs saturate int16)"
                              if limit < 127 else f"weight codes up to {q.abs().max().item()} in magnitude "
                              f"(int8 holds 127)")
        scale = g.scale.detach().float().reshape(-1)
        scale = scale.expand(c.shape[0]).contiguous() if scale.numel() == 1 else scale.contiguous()
        out.append((q.to(torch.int8).contiguous(), scale))
    return out


class IntegerLayer(nn.Module):
    """What the integer backends share: a frozen Linear or Conv2d with integer weights,
    quantized inputs and zero padding, its inputs' grids, bias and conv settings, the
    rounding of an input to its codes, and the cut of an input at a shortcut split."""

    holds_weights = True  # the kernel's weights are the only copy (see QuantLayer.freeze)

    def __init__(self, spec: LayerSpec):
        super().__init__()
        if spec.kind not in INTEGER_KINDS:
            raise Unsupported(f"{spec.kind} layers")
        if spec.weight_codes is None:
            raise Unsupported("float weights")
        if not spec.input_grids:
            raise Unsupported("float activations")
        if any(g.group for g in spec.weight_grids):
            raise Unsupported("weight step sizes per group of inputs")
        if any(g.per_token for g in spec.input_grids):
            raise Unsupported("per-token activation ranges")
        if spec.outliers is not None:
            raise Unsupported("outlier transforms (smoothing, rotation, low-rank branch)")
        if spec.padding_mode != "zeros" or isinstance(spec.padding, str):
            raise Unsupported(f"padding {spec.padding_mode!r}/{spec.padding!r}")
        self.kind, self.split = spec.kind, spec.split
        self.inputs = [_input_grid(g) for g in spec.input_grids]  # (s, z, lo, hi) on 0..255
        self.register_buffer("input_scales", torch.stack([g.scale.detach().reshape(()).float()
                                                          for g in spec.input_grids]), persistent=False)
        self.register_buffer("bias", None if spec.bias is None else spec.bias.detach().float().contiguous(),
                             persistent=False)
        self.stride, self.padding = list(spec.stride), list(spec.padding)
        self.dilation, self.groups = list(spec.dilation), spec.groups

    def _codes(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """``x``'s codes on input grid ``i`` (0..255, in float): ``clamp(round(x / s) + z)``,
        as the fake backend rounds (the division by the same float32 step size)."""
        _, z, lo, hi = self.inputs[i]
        return torch.div(x, self.input_scales[i]).round_().add_(z).clamp_(lo, hi)

    def _parts(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x`` in float32, cut at the split (a Linear's last dimension, a conv's channels)."""
        dim = -1 if self.kind == "linear" else 1
        sizes = (x.shape[dim],) if self.split is None else (self.split, x.shape[dim] - self.split)
        return x.float().split(sizes, dim)

    def extra_repr(self) -> str:
        return f"{self.kind}, parts={len(self.inputs)}"


class Int8Layer(IntegerLayer):
    """A frozen Linear or Conv2d on oneDNN's int8 kernels (see the module docstring)."""

    runs_on = "int8"

    def __init__(self, spec: LayerSpec):
        if not available():
            raise Unsupported("this torch build has no oneDNN int8 kernels")
        super().__init__(spec)
        if spec.weight_codes.device.type != "cpu":
            raise Unsupported("a device other than the CPU")
        parts = centred_weights(spec, 127 if vnni() else 64)
        self.packed, self.w_scales = [], []
        for i, (q, scale) in enumerate(parts):
            if self.kind == "linear":
                packed = torch.ops.onednn.qlinear_prepack(q, None)
            else:
                s, z = self.inputs[i][0], self.inputs[i][1]
                packed = torch.ops.onednn.qconv_prepack(q, scale, s, z, self.stride, self.padding, self.dilation,
                                                        self.groups, None)
            self.packed.append(packed)  # an opaque oneDNN tensor: kept out of the module's buffers
            self.w_scales.append(scale)
        self.w_zero = torch.zeros(parts[0][0].shape[0], dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for i, p in enumerate(self._parts(x)):
            s, z = self.inputs[i][0], self.inputs[i][1]
            bias = self.bias if i == len(self.inputs) - 1 else None
            packed, w_scale = self.packed[i], self.w_scales[i]
            if self.kind == "linear":
                q = self._codes(p.reshape(-1, p.shape[-1]), i).to(torch.uint8)
                y = torch.ops.onednn.qlinear_pointwise(q, s, z, packed, w_scale, self.w_zero, bias, 1.0, 0,
                                                       torch.float32, "none", [], "")
                y = y.reshape(*p.shape[:-1], y.shape[-1])
            else:
                q = self._codes(p, i).to(torch.uint8).contiguous(memory_format=torch.channels_last)
                y = torch.ops.onednn.qconv_pointwise(q, s, z, packed, w_scale, self.w_zero, bias, self.stride,
                                                     self.padding, self.dilation, self.groups, 1.0, 0,
                                                     torch.float32, "none", [], "")
            out = y if out is None else out.add_(y)
        return out.to(x.dtype)


def with_fallback(cls):
    """A backend builder: ``cls(spec)``, or the fake layer (with the reason) where ``cls``
    cannot run the layer."""
    def build(spec: LayerSpec) -> nn.Module:
        try:
            return cls(spec)
        except Unsupported as e:
            layer = FakeQuantLayer(spec)
            layer.runs_on, layer.why = "fake", str(e)
            return layer

    return build


register_backend("int8", with_fallback(Int8Layer), device="cpu",
                 unavailable=lambda: None if available() else "this torch build has no oneDNN int8 kernels")
