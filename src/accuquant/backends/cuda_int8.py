"""The ``cuda-int8`` backend: Linear on ``torch._int_mm`` (int8 x int8 summed in int32),
Conv2d in bfloat16 on the integer codes; meant for NVIDIA GPUs, where torch has no int8
convolution and oneDNN's kernels do not run.

A layer's input is rounded to its calibrated codes as the ``fake`` backend rounds them.
Linear: the codes, shifted into int8 (``u - 128`` for an unsigned grid), are multiplied by
the weight's ``q - z`` in int32; the shift comes back exactly through each output
channel's sum of weight codes, and the result is scaled once, so the output is ``fake``'s
up to float rounding (tested to 1e-5). Conv2d: ``u - z`` and ``q - z`` are integers that
bfloat16 holds exactly (at most 256 in magnitude), and the convolution sums them in float32
but returns bfloat16, so a conv's output is ``fake``'s to about 2^-9 relative per element
(tested to 4e-3); the codes are held in int8 and cast on each call, so the weights stay
one byte each. Attention keeps float matmuls on the fake-quantized inputs.

``torch._int_mm`` on CUDA wants more than 16 rows and inner and outer sizes that are
multiples of 8: the weight is padded with zero rows and columns once, and a call with
fewer rows is padded. The same code runs wherever ``torch._int_mm`` does, the CPU
included, which is how the tests check it without a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LayerSpec, register_backend
from .int8 import IntegerLayer, Unsupported, centred_weights, with_fallback

#: at least this many rows, and sizes padded to a multiple of ``ALIGN``: what cuBLASLt's
#: int8 matmul behind ``torch._int_mm`` takes on CUDA
MIN_ROWS, ALIGN = 17, 8


def _pad_to(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class IntMMLayer(IntegerLayer):
    """A frozen Linear (``torch._int_mm``) or Conv2d (bfloat16 on codes); see the module docstring."""

    runs_on = "cuda-int8"

    def __init__(self, spec: LayerSpec):
        if not hasattr(torch, "_int_mm"):
            raise Unsupported("this torch build has no torch._int_mm")
        super().__init__(spec)
        parts = centred_weights(spec)
        self.out_features = parts[0][0].shape[0]
        n_out = _pad_to(self.out_features)
        for i, (q, scale) in enumerate(parts):
            s = self.inputs[i][0]
            if self.kind == "linear":
                k = q.shape[1]
                w = torch.zeros(n_out, _pad_to(k), dtype=torch.int8)
                w[:q.shape[0], :k] = q
                self.register_buffer(f"w{i}", w, persistent=False)  # (out, in): _int_mm takes its transpose
                self.register_buffer(f"wsum{i}", w.sum(1, dtype=torch.int32), persistent=False)
                out_scale = torch.zeros(n_out)
                out_scale[:q.shape[0]] = scale * s
            else:
                self.register_buffer(f"w{i}", q, persistent=False)
                out_scale = (scale * s).reshape(1, -1, 1, 1)
            self.register_buffer(f"scale{i}", out_scale, persistent=False)

    def _linear(self, x: torch.Tensor, i: int) -> torch.Tensor:
        z = self.inputs[i][1]
        w = getattr(self, f"w{i}")
        rows = x.reshape(-1, x.shape[-1])
        a = torch.zeros(max(rows.shape[0], MIN_ROWS), w.shape[1], dtype=torch.int8, device=x.device)
        a[:rows.shape[0], :rows.shape[1]] = self._codes(rows, i).sub_(128)
        acc = torch._int_mm(a, w.t())[:rows.shape[0]]
        if z != 128:
            acc = acc.add_(getattr(self, f"wsum{i}") * (128 - z))
        y = acc.float().mul_(getattr(self, f"scale{i}"))[:, :self.out_features]
        return y.reshape(*x.shape[:-1], self.out_features)

    def _conv(self, x: torch.Tensor, i: int) -> torch.Tensor:
        z = self.inputs[i][1]
        a = self._codes(x, i).sub_(z).to(torch.bfloat16)
        w = getattr(self, f"w{i}").to(torch.bfloat16)
        y = F.conv2d(a, w, None, self.stride, self.padding, self.dilation, self.groups)
        return y.float().mul_(getattr(self, f"scale{i}"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for i, p in enumerate(self._parts(x)):
            y = self._linear(p, i) if self.kind == "linear" else self._conv(p, i)
            out = y if out is None else out.add_(y)
        if self.bias is not None:
            out = out.add_(self.bias if self.kind == "linear" else self.bias.reshape(1, -1, 1, 1))
        return out.to(x.dtype)


register_backend("cuda-int8", with_fallback(IntMMLayer), device="cuda")
