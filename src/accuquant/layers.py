"""Quantized layers: wrappers around ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Linear``.

A :class:`QuantLayer` holds the original module (its weight is the only copy) and
quantizers for the weight and the input. It has two states:

* calibrating: the float weight is fake-quantized on every forward, so the quantizers'
  step sizes and rounding can be learned;
* frozen (:meth:`QuantLayer.freeze`): the float weight is replaced by its integer codes
  (``uint8``), and the forward dequantizes them. A saved and reloaded model runs exactly
  this computation, so its outputs are bit-identical.

Shortcut splitting: a layer whose input is the channel concatenation ``[h, skip]`` (the
shortcut conv of a UNet up-block resnet) gets two input quantizers and two weight
quantizers, one per part, split at input channel ``split``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import QuantAttnProcessor
from .config import QuantConfig
from .quantizers import UniformQuantizer

WRAPPABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
STANDARD_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "QuantAttnProcessor")


def _weight_quantizer(weight: torch.Tensor, cfg: QuantConfig) -> UniformQuantizer:
    if cfg.weight_granularity == "channel":
        shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
        return UniformQuantizer(cfg.weight_bits, cfg.weight_symmetric, shape, axis=0)
    return UniformQuantizer(cfg.weight_bits, cfg.weight_symmetric)


class QuantLayer(nn.Module):
    """A Conv1d/Conv2d/Linear with fake-quantized weight and input.

    Args:
        module: the layer to wrap (kept, not copied).
        cfg: bit widths and grids.
        split: input channel at which a concatenated input is split (shortcut splitting),
            or ``None``.
    """

    def __init__(self, module: nn.Module, cfg: QuantConfig, split: int | None = None):
        super().__init__()
        if not isinstance(module, WRAPPABLE):
            raise TypeError(f"cannot wrap {type(module).__name__}")
        self.module = module
        self.split = split
        w = module.weight
        parts = [w] if split is None else [w[:, :split], w[:, split:]]
        self.weight_quant = nn.ModuleList(
            [_weight_quantizer(p, cfg) for p in parts] if cfg.weight_bits is not None else []
        )
        n_in = 1 if split is None else 2
        self.input_quant = nn.ModuleList(
            [UniformQuantizer(cfg.act_bits, cfg.act_symmetric) for _ in range(n_in)] if cfg.act_bits is not None else []
        )
        self.register_buffer("weight_codes", None)

    # ------------------------------------------------------------------ helpers
    @property
    def frozen(self) -> bool:
        return self.weight_codes is not None

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias

    def _parts(self, t: torch.Tensor, dim: int) -> list[torch.Tensor]:
        if self.split is None:
            return [t]
        return [t.narrow(dim, 0, self.split), t.narrow(dim, self.split, t.shape[dim] - self.split)]

    def weight_parts(self) -> list[tuple[UniformQuantizer, torch.Tensor]]:
        """Each weight quantizer with the slice of the float weight it quantizes (both halves
        of a split layer; the layer must not be frozen)."""
        return list(zip(self.weight_quant, self._parts(self.module.weight, 1)))

    @property
    def weight(self) -> torch.Tensor:
        """The weight as the forward uses it (dequantized codes when frozen)."""
        if self.frozen:
            parts = self._parts(self.weight_codes, 1)
            return torch.cat(
                [q.from_int(c.to(torch.int16) + q.qmin) for q, c in zip(self.weight_quant, parts)], dim=1
            )
        if not self.weight_quant:
            return self.module.weight
        return torch.cat([q(p) for q, p in self.weight_parts()], dim=1)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_quant:
            return x
        ch_dim = 1 if isinstance(self.module, (nn.Conv1d, nn.Conv2d)) else -1
        if self.split is None:
            return self.input_quant[0](x)
        return torch.cat([q(p) for q, p in zip(self.input_quant, self._parts(x, ch_dim))], dim=ch_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        w = self.weight
        if isinstance(self.module, nn.Linear):
            return F.linear(x, w, self.module.bias)
        return self.module._conv_forward(x, w, self.module.bias)

    @torch.no_grad()
    def freeze(self) -> None:
        """Replace the float weight by its integer codes (stored as ``q - qmin``, uint8)."""
        if self.frozen or not self.weight_quant:
            return
        codes = [q.to_int(p) - q.qmin for q, p in self.weight_parts()]
        self.weight_codes = torch.cat(codes, dim=1).to(torch.uint8)
        for q in self.weight_quant:
            q.alpha = None
            q.codes = None
        del self.module.weight

    def quantizers(self) -> dict[str, UniformQuantizer]:
        out = {f"weight_quant.{i}": q for i, q in enumerate(self.weight_quant)}
        out.update({f"input_quant.{i}": q for i, q in enumerate(self.input_quant)})
        return out

    def extra_repr(self) -> str:
        return f"split={self.split}, frozen={self.frozen}"


@dataclass
class WrapReport:
    """What :func:`wrap_model` did, by module name."""

    quantized: list[str] = field(default_factory=list)
    kept_fp: list[str] = field(default_factory=list)
    split: dict[str, int] = field(default_factory=dict)
    attention: list[str] = field(default_factory=list)
    attention_fp: list[str] = field(default_factory=list)
    other_fp: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "quantized": self.quantized,
            "kept_fp": self.kept_fp,
            "split": self.split,
            "attention": self.attention,
            "attention_fp": self.attention_fp,
            "other_fp": self.other_fp,
        }

    def summary(self) -> str:
        lines = [
            f"quantized layers: {len(self.quantized)} (shortcut-split: {len(self.split)})",
            f"attention processors quantized: {len(self.attention)} (left as they were: {len(self.attention_fp)})",
            f"layers kept in full precision: {', '.join(self.kept_fp) or 'none'}",
            f"other modules with float parameters (norms, embeddings): {len(self.other_fp)}",
        ]
        return "\n".join(lines)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def wrap_model(model: nn.Module, cfg: QuantConfig, splits: dict[str, int] | None = None) -> WrapReport:
    """Wrap every Conv/Linear of ``model`` in place and install quantized attention processors.

    Args:
        model: a diffusers denoiser (or any ``nn.Module``).
        cfg: the quantization config.
        splits: module name -> input split channel, for shortcut splitting.

    Returns:
        a :class:`WrapReport` naming what was quantized and what stayed in full precision.
    """
    splits = splits if cfg.split_shortcut and splits else {}
    report = WrapReport()
    targets = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLayer):
            raise ValueError("model is already quantized")
        if isinstance(mod, WRAPPABLE):
            targets.append((name, mod))
        elif any(p is not None for p in mod._parameters.values()) and not isinstance(mod, WRAPPABLE):
            report.other_fp.append(name)
    quantize_weights_or_acts = cfg.weight_bits is not None or cfg.act_bits is not None
    for name, mod in targets:
        if not quantize_weights_or_acts or any(fnmatch.fnmatchcase(name, p) for p in cfg.keep_fp):
            report.kept_fp.append(name)
            continue
        split = splits.get(name)
        _set_submodule(model, name, QuantLayer(mod, cfg, split))
        report.quantized.append(name)
        if split is not None:
            report.split[name] = split
    attn_bits, sm_bits = cfg.resolved_attn_bits, cfg.resolved_softmax_bits
    if attn_bits is not None or sm_bits is not None:
        for name, mod in model.named_modules():
            if not (hasattr(mod, "set_processor") and hasattr(mod, "to_q") and hasattr(mod, "head_to_batch_dim")):
                continue
            # Only diffusers' plain attention is re-implemented; other processors carry their
            # own logic and keep it (their matmul inputs stay in floating point).
            if type(mod.processor).__name__ in STANDARD_PROCESSORS:
                mod.set_processor(QuantAttnProcessor(attn_bits, sm_bits, cfg.act_symmetric))
                report.attention.append(name)
            else:
                report.attention_fp.append(name)
    return report


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def all_quantizers(model: nn.Module) -> dict[str, UniformQuantizer]:
    """Every quantizer of a wrapped model, by a stable dotted name."""
    out: dict[str, UniformQuantizer] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, UniformQuantizer):
            out[name] = mod
    return out


def freeze_model(model: nn.Module) -> None:
    """Freeze every :class:`QuantLayer` (weights become integer codes)."""
    for layer in quant_layers(model).values():
        layer.freeze()
