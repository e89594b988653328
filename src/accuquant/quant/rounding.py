"""Learned weight rounding (AdaRound) over a set of quantized layers, for the methods that learn it.

A learnable rounding is ``floor(w / s) + h(alpha)`` with soft ``h`` while learning and
hard ``alpha >= 0`` after; fixed codes (:meth:`UniformQuantizer.fix_codes`) keep hard
decisions while a step size moves.
"""

from __future__ import annotations

import torch

from .layers import QuantLayer
from .quantizers import UniformQuantizer


def _weight_quantizers(layers: dict[str, QuantLayer]):
    for name, layer in layers.items():
        if layer.frozen:
            continue
        for j, (q, part) in enumerate(layer.weight_parts()):
            if q.enabled:
                yield f"{name}.weight_quant.{j}", q, part


def learnable_rounding(layers: dict[str, QuantLayer], margin: float | None = None,
                       resumed: bool = False) -> dict[str, torch.nn.Parameter]:
    """Make every weight quantizer's rounding learnable and soft; return the variables by
    name. A quantizer that rounds to nearest starts from the weights' fractional parts; a
    hard decision already learned becomes ``alpha = +-margin`` (a soft value close to it),
    unless ``resumed`` (the variables come from a checkpoint as they are)."""
    out = {}
    for name, q, part in _weight_quantizers(layers):
        if q.alpha is None:
            q.enable_learned_rounding(part.detach())
        elif not resumed and margin is not None:
            with torch.no_grad():
                q.alpha = torch.nn.Parameter(torch.where(q.alpha >= 0, margin, -margin).to(q.alpha))
        q.soft_rounding = True
        out[f"{name}.alpha"] = q.alpha
    return out


def penalty(quantizers, beta: float) -> torch.Tensor:
    """AdaRound's regulariser summed over ``quantizers`` (those without rounding variables add 0)."""
    return sum(q.rounding_regularizer(beta) for q in quantizers)


def harden(layers: dict[str, QuantLayer], start: dict[str, torch.Tensor] | None = None) -> dict:
    """Back to hard decisions (``alpha >= 0``), which is what is saved. With ``start`` (the
    decisions at the start, by variable name): the share of decisions that changed, and the
    share still undecided (soft value between 0.1 and 0.9) just before hardening."""
    changed = undecided = total = 0
    for name, q, _ in _weight_quantizers(layers):
        if q.alpha is None:
            continue
        if start is not None:
            with torch.no_grad():
                h = q._rounding_offset()
                undecided += int(((h > 0.1) & (h < 0.9)).sum())
                prev = start.get(f"{name}.alpha")
                if prev is not None:
                    changed += int(((q.alpha >= 0) != prev).sum())
                total += q.alpha.numel()
        q.soft_rounding = False
    return {"changed": changed / max(1, total), "undecided_before_hardening": undecided / max(1, total)}


def fix_learned_codes(layers: dict[str, QuantLayer]) -> None:
    """Turn every hard learned rounding into fixed integer codes."""
    for _, q, part in _weight_quantizers(layers):
        if q.alpha is not None:
            q.fix_codes(part.detach())


def weight_quantizers(layers: dict[str, QuantLayer]) -> list[UniformQuantizer]:
    return [q for _, q, _ in _weight_quantizers(layers)]
