"""Quantized layers: wrappers around ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Linear``.

A :class:`QuantLayer` holds the original module (its weight is the only copy) and
quantizers for the weight and the input. It has two states:

* calibrating: the float weight is fake-quantized on every forward, so the quantizers'
  step sizes and rounding can be learned;
* frozen (:meth:`QuantLayer.freeze`): the float weight is replaced by its integer codes
  (packed into bytes, what is saved), and the forward runs a backend module built from the
  layer's :class:`~accuquant.backends.LayerSpec` (:mod:`accuquant.backends`). A saved and
  reloaded model builds the same module, so its outputs are bit-identical.

Shortcut splitting: a layer whose input is the channel concatenation ``[h, skip]`` (the
shortcut conv of a UNet up-block resnet) gets two input quantizers and two weight
quantizers, one per part, split at input channel ``split``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import QuantAttnProcessor
from .processors import QUANT_PROCESSORS
from ..backends import Grid, LayerSpec, get_backend
from ..config import QuantConfig
from ..errors import AccuQuantError
from .outliers import Outliers, fold_rotations, rotate
from .packing import pack_signed, unpack_signed
from .quantizers import TokenQuantizer, UniformQuantizer

WRAPPABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


def weight_group(weight: torch.Tensor, cfg: QuantConfig) -> int | None:
    """The group size of ``weight``'s quantizer: ``cfg.weight_group`` where it divides the
    weight's inputs per output channel (inputs times kernel); else ``None``, one range per
    output channel (a 3-channel input conv at group 64)."""
    g = cfg.weight_group
    return g if g is not None and weight[0].numel() % g == 0 and weight[0].numel() > g else None


def _weight_quantizer(weight: torch.Tensor, cfg: QuantConfig) -> UniformQuantizer:
    if cfg.weight_granularity == "channel":
        group = weight_group(weight, cfg)
        if group is not None:
            shape = (weight.shape[0], weight[0].numel() // group, 1)
            return UniformQuantizer(cfg.weight_bits, cfg.weight_symmetric, shape, axis=0, group=group)
        shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
        return UniformQuantizer(cfg.weight_bits, cfg.weight_symmetric, shape, axis=0)
    return UniformQuantizer(cfg.weight_bits, cfg.weight_symmetric)


def _input_quantizer(module: nn.Module, cfg: QuantConfig) -> UniformQuantizer:
    if cfg.act_granularity == "token":
        return TokenQuantizer(cfg.act_bits, cfg.act_symmetric, dim=-1 if isinstance(module, nn.Linear) else 1)
    return UniformQuantizer(cfg.act_bits, cfg.act_symmetric)


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
            [_input_quantizer(module, cfg) for _ in range(n_in)] if cfg.act_bits is not None else []
        )
        #: smoothing, rotation, low-rank branch (``cfg.outliers``): not for a grouped conv, nor
        #: for a split one unless ``cfg.conv_outliers`` (then without rotation, which would mix the parts)
        self.outliers = None
        linear = isinstance(module, nn.Linear)
        pointwise = not linear and all(k == 1 for k in module.kernel_size + module.stride) and (
            isinstance(module.padding, str) or not any(module.padding))  # 1x1 with "same": no padding
        kinds = tuple(k for k in cfg.outliers if split is None or k != "rotate")
        if kinds and (split is None or cfg.conv_outliers) and getattr(module, "groups", 1) == 1:
            o = Outliers(kinds, w.shape[1], w.shape[0], cfg.rank, -1 if linear else 1,
                         branch=linear or (cfg.conv_outliers and pointwise))
            self.outliers = o if o.active else None
        #: a Hadamard rotation of the outputs, in blocks of ``out_block`` (a consumer's input
        #: rotation folded here: :func:`fold_rotations`); part of the weight, so quantized with it
        self.out_block: int | None = None
        self.register_buffer("weight_codes", None)
        self.register_module("kernel", None)  # the backend module, once frozen
        self.codes_in_kernel = False  # the codes were dropped: the kernel holds the only copy
        self.codes_shape: tuple[int, ...] | None = None  # the weight's shape, of the packed codes

    # ------------------------------------------------------------------ the wrapped layer's shape
    # (pipelines read them: SDXL's reads ``add_embedding.linear_1.in_features``)
    in_features = property(lambda self: self.module.in_features)
    out_features = property(lambda self: self.module.out_features)
    in_channels = property(lambda self: self.module.in_channels)
    out_channels = property(lambda self: self.module.out_channels)

    # ------------------------------------------------------------------ helpers
    @property
    def frozen(self) -> bool:
        return self.weight_codes is not None or self.codes_in_kernel

    def _need_codes(self) -> None:
        if self.codes_in_kernel and not hasattr(self.kernel, "codes"):
            b = self.kernel.runs_on
            raise AccuQuantError(f"this model's integer weights live only in its {b} kernels (a model loaded with "
                                 f"backend {b} keeps no other copy); load it again for another backend or to save it")

    @property
    def codes_bits(self) -> int:
        return max(q.bits for q in self.weight_quant)

    def int_codes(self) -> torch.Tensor:
        """The frozen weight's integer codes (int16, in each part's ``[qmin, qmax]``), unpacked
        from this layer's bytes or given back by the kernel that holds the only copy."""
        self._need_codes()
        if self.codes_in_kernel:
            return self.kernel.codes()
        return unpack_signed(self.weight_codes, self._qmins(), self.split, self.codes_bits, self.codes_shape)

    def _qmins(self) -> list[int]:
        return [q.qmin for q in self.weight_quant]

    def _parts(self, t: torch.Tensor, dim: int) -> list[torch.Tensor]:
        if self.split is None:
            return [t]
        return [t.narrow(dim, 0, self.split), t.narrow(dim, self.split, t.shape[dim] - self.split)]

    def base_weight(self) -> torch.Tensor:
        """The float weight, its outputs rotated where a consumer's rotation is folded here."""
        w = self.module.weight
        return w if self.out_block is None else rotate(w, 0, self.out_block)

    def bias(self) -> torch.Tensor | None:
        b = self.module.bias
        return b if b is None or self.out_block is None else rotate(b, 0, self.out_block)

    def _float_weight(self) -> torch.Tensor:
        w = self.base_weight()
        return w if self.outliers is None else self.outliers.residual(w)

    def weight_parts(self) -> list[tuple[UniformQuantizer, torch.Tensor]]:
        """Each weight quantizer with the slice of the float weight it quantizes (both halves
        of a split layer; with outlier handling, the residual ``R``; the layer must not be frozen)."""
        return list(zip(self.weight_quant, self._parts(self._float_weight(), 1)))

    @property
    def weight(self) -> torch.Tensor:
        """The weight as the forward uses it (dequantized codes when frozen)."""
        if self.frozen:
            return torch.cat([q.from_int(c) for q, c in zip(self.weight_quant, self._parts(self.int_codes(), 1))],
                             dim=1)
        if not self.weight_quant:
            return self._float_weight()
        return torch.cat([q(p) for q, p in self.weight_parts()], dim=1)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_quant:
            return x
        ch_dim = 1 if isinstance(self.module, (nn.Conv1d, nn.Conv2d)) else -1
        if self.split is None:
            return self.input_quant[0](x)
        return torch.cat([q(p) for q, p in zip(self.input_quant, self._parts(x, ch_dim))], dim=ch_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x)
        if self.outliers is not None:
            x = self.outliers.input(x)
        xq, w = self.quantize_input(x), self.weight
        if isinstance(self.module, nn.Linear):
            y = F.linear(xq, w, self.bias())
        else:
            y = self.module._conv_forward(xq, w, self.bias())
        b = self.outliers.branch(x) if self.outliers is not None else None
        return y if b is None else y + b

    @torch.no_grad()
    def freeze(self, backend: str = "fake") -> None:
        """Replace the float weight by its integer codes (``q - qmin``, packed into bytes:
        :mod:`~accuquant.quant.packing`) and run the layer on ``backend`` from here on. A
        kernel that holds the weight itself (``holds_weights``) takes the only copy: the
        codes are dropped, so the model stays small. Where that kernel can give the codes
        back (``codes()``: the ``fake`` and ``packed`` backends) the model can still be
        saved and moved to another backend; the int8 kernels' prepacked tensors cannot."""
        build = get_backend(backend)
        if not self.frozen and self.weight_quant:
            self._hold_codes(torch.cat([q.to_int(p) for q, p in self.weight_parts()], dim=1))
            for q in self.weight_quant:
                q.alpha = None
                q.codes = None
            del self.module.weight
        spec = self.spec()
        self.kernel = build(spec)
        if getattr(self.kernel, "holds_weights", False):
            self.weight_codes, self.codes_in_kernel = None, True
        elif self.codes_in_kernel:  # from a kernel that held them to one that does not
            self.codes_in_kernel = False
            self._hold_codes(spec.weight_codes)

    def _hold_codes(self, codes: torch.Tensor) -> None:
        """Hold integer ``codes`` (each part in its ``[qmin, qmax]``) packed."""
        self.codes_shape = tuple(codes.shape)
        self.weight_codes = pack_signed(codes, self._qmins(), self.split, self.codes_bits)

    def packed_codes(self) -> torch.Tensor:
        """The codes ``q - qmin`` packed into bytes, as held in memory and saved."""
        if not self.codes_in_kernel:
            return self.weight_codes
        return pack_signed(self.int_codes(), self._qmins(), self.split, self.codes_bits)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The state dict holds the codes wherever they live (a model's fingerprint and its
        saved file cover them)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.codes_in_kernel and hasattr(self.kernel, "codes"):
            destination[prefix + "weight_codes"] = self.packed_codes()

    @torch.no_grad()
    def spec(self) -> LayerSpec:
        """The deployable description of this layer (integer codes when frozen)."""
        m = self.module
        grids = lambda qs: [Grid(q.scale.detach(), q.zero_point, q.bits, q.symmetric, q.group,  # noqa: E731
                                 isinstance(q, TokenQuantizer)) for q in qs]
        codes = None
        if self.frozen:
            codes = self.int_codes()
        elif self.weight_quant:
            codes = torch.cat([q.to_int(p) for q, p in self.weight_parts()], dim=1)
        kind = "linear" if isinstance(m, nn.Linear) else "conv1d" if isinstance(m, nn.Conv1d) else "conv2d"
        conv = {} if kind == "linear" else dict(stride=m.stride, padding=m.padding, dilation=m.dilation,
                                                 groups=m.groups, padding_mode=m.padding_mode)
        bias = self.bias().detach() if m.bias is not None else None
        weight = None
        if codes is None:
            weight = self._float_weight().detach()
        return LayerSpec(kind, codes, grids(self.weight_quant) if codes is not None else [], grids(self.input_quant),
                         bias, weight=weight, split=self.split, outliers=self.outliers, **conv)

    def extra_repr(self) -> str:
        return f"split={self.split}, frozen={self.frozen}" + (
            f", outputs rotated (blocks of {self.out_block})" if self.out_block else "")


@dataclass
class WrapReport:
    """What :func:`wrap_model` did, by module name."""

    quantized: list[str] = field(default_factory=list)
    kept_fp: list[str] = field(default_factory=list)
    split: dict[str, int] = field(default_factory=dict)
    attention: list[str] = field(default_factory=list)
    attention_fp: list[str] = field(default_factory=list)
    other_fp: list[str] = field(default_factory=list)
    #: layers whose input rotation is folded into the layers producing it (the rest rotate online)
    rotation_folded: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WrapReport":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def matches(name: str, patterns) -> bool:
    """Whether module ``name`` matches one of the fnmatch ``patterns`` (a family's or a config's)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def kept_fp(name: str, cfg: QuantConfig) -> bool:
    """Whether layer ``name`` stays in full precision by ``cfg.keep_fp``'s patterns."""
    return matches(name, cfg.keep_fp or ())


def layer_config(cfg: QuantConfig, name: str) -> QuantConfig:
    """The config of layer ``name``: ``cfg`` with its own bits where ``cfg.layer_bits`` gives them."""
    if not cfg.layer_bits or name not in cfg.layer_bits:
        return cfg
    w, a = cfg.layer_bits[name]
    return dataclasses.replace(cfg, weight_bits=w, act_bits=a, layer_bits=None, mixed_precision=None,
                               act_mixed_precision=None)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def wrap_model(model: nn.Module, cfg: QuantConfig, splits: dict[str, int] | None = None,
               processors: tuple[str, ...] = (), attention: list[str] | None = None,
               folded: dict[str, list[str]] | None = None) -> WrapReport:
    """Wrap every Conv/Linear of ``model`` in place and install quantized attention processors.

    Args:
        model: a diffusers denoiser (or any ``nn.Module``).
        cfg: the quantization config; its ``keep_fp`` patterns (``None``: none) stay in
            full precision (the caller resolves a family's defaults into it).
        splits: module name -> input split channel, for shortcut splitting.
        processors: class names of the attention processors replaced by their quantized
            twin (others carry their own logic and keep it, their matmul inputs in FP).
        attention: instead of ``processors``, the names of the attention modules whose
            processor is replaced (what a saved model recorded).
        folded: instead of folding every rotation that :func:`fold_rotations` can, fold
            those of these layers (what a saved model recorded; older ones recorded none).

    Returns:
        a :class:`WrapReport` naming what was quantized and what stayed in full precision.
    """
    splits = splits if cfg.split_shortcut and splits else {}
    report = WrapReport()
    targets = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLayer):
            raise AccuQuantError("the model is already quantized")
        if isinstance(mod, WRAPPABLE):
            targets.append((name, mod))
        elif any(p is not None for p in mod._parameters.values()):
            report.other_fp.append(name)
    quantize_weights_or_acts = cfg.weight_bits is not None or cfg.act_bits is not None
    for name, mod in targets:
        if not quantize_weights_or_acts or kept_fp(name, cfg):
            report.kept_fp.append(name)
            continue
        split = splits.get(name)
        _set_submodule(model, name, QuantLayer(mod, layer_config(cfg, name), split))
        report.quantized.append(name)
        if split is not None:
            report.split[name] = split
    attn_bits, sm_bits = cfg.resolved_attn_bits, cfg.resolved_softmax_bits
    if attn_bits is not None or sm_bits is not None:
        chosen = None if attention is None else set(attention)
        for name, mod in model.named_modules():
            if not (hasattr(mod, "set_processor") and hasattr(mod, "processor") and hasattr(mod, "to_q")):
                continue
            kind = type(mod.processor).__name__
            wanted = kind in processors if chosen is None else name in chosen
            if wanted and kind in QUANT_PROCESSORS:
                mod.set_processor(QUANT_PROCESSORS[kind](attn_bits, sm_bits, cfg.act_symmetric))
                report.attention.append(name)
            elif wanted:
                raise AccuQuantError(f"{name}: no quantized twin of its attention processor {kind}")
            else:
                report.attention_fp.append(name)
    if cfg.outliers and "rotate" in cfg.outliers:
        report.rotation_folded = fold_rotations(model, None if folded is None else set(folded))
    return report


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def outlier_parameters(layers: dict[str, QuantLayer]) -> dict[str, nn.Parameter]:
    """The learnable parameters of the layers' outlier transforms (smoothing scales' logs,
    branch factors), by name."""
    return {f"{n}.outliers.{k}": p for n, lyr in layers.items() if lyr.outliers is not None
            for k, p in lyr.outliers.parameters_to_learn().items()}


def all_quantizers(model: nn.Module) -> dict[str, UniformQuantizer]:
    """Every quantizer of a wrapped model, by a stable dotted name."""
    out: dict[str, UniformQuantizer] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, UniformQuantizer):
            out[name] = mod
    return out


def freeze_model(model: nn.Module, backend: str = "fake") -> None:
    """Freeze every :class:`QuantLayer` (weights become integer codes) and run it on
    ``backend`` (a frozen model can be moved to another backend the same way); the
    quantized attention processors learn the backend too (see :class:`QuantAttnProcessor`)."""
    get_backend(backend)
    for layer in quant_layers(model).values():
        layer.freeze(backend)
    for m in model.modules():
        if isinstance(m, QuantAttnProcessor):
            m.backend = backend
