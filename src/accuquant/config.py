"""Quantization settings: one dataclass that validates itself and round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

FORMAT_VERSION = 1

#: Bit widths that mean "keep this tensor in floating point".
FLOAT_BITS = (16, 32)

GRANULARITIES = ("channel", "tensor")
INIT_METHODS = ("minmax", "percentile", "mse")


def _norm_bits(name: str, value: Any, allow_act: bool = False) -> int | str | None:
    """Return bits as an int in 2..8, ``None`` for "not quantized", or ``"act"``."""
    if value is None:
        return None
    if allow_act and value == "act":
        return "act"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer bit width, got {value!r}")
    if value in FLOAT_BITS:
        return None
    if not 2 <= value <= 8:
        raise ConfigError(f"{name}: {value} bits is out of range (2 to 8, or 16/32/None for floating point)")
    return value


class JSONConfig:
    """JSON round trip of a config dataclass with ``to_dict`` / ``from_dict``; ``WHAT`` names
    it in error messages."""

    WHAT = "config"

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cls.WHAT}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.WHAT}: expected a JSON object")
        return cls.from_dict(d)


@dataclass
class QuantConfig(JSONConfig):
    """What to quantize and how.

    Args:
        weight_bits: bits of weights, 2 to 8; ``None`` (or 16/32) keeps weights in floating point.
        act_bits: bits of layer inputs (activations), 2 to 8; ``None`` (or 16/32) keeps them in
            floating point.
        weight_granularity: ``"channel"`` (one range per output channel) or ``"tensor"``.
        act_granularity: ``"tensor"`` (one range per tensor); ``"channel"`` is refused for
            activations, whose channel statistics change with the time step.
        weight_symmetric: symmetric signed grid ``[-(2^(b-1)-1), 2^(b-1)-1]`` with zero point 0,
            or (``False``) an affine grid ``[0, 2^b-1]`` with an integer zero point.
        act_symmetric: the same choice for activations.
        attn_bits: bits of the inputs of the attention matmuls (Q and K of Q.K^T, V of softmax.V);
            ``"act"`` follows ``act_bits``; ``None`` keeps them in floating point.
        softmax_bits: bits of the softmax output (the other input of softmax.V); ``"act"``
            follows ``act_bits``; ``None`` keeps it in floating point.
        keep_fp: fnmatch patterns of full module names left in full precision; ``None``: the
            model family's defaults (its adapter's ``keep_fp``: a UNet's ``conv_in`` and
            ``conv_out``, a DiT's patch embedding and output projections).
        split_shortcut: quantize the channel-concatenated input of UNet up-block shortcut layers
            as two parts (skip connection and upsampled features), each with its own range.
        weight_init: range search of weight quantizers: ``"minmax"``, ``"percentile"`` or ``"mse"``.
        act_init: range search of activation quantizers, from calibration data.
        percentile: the percentile used by ``"percentile"`` range search.
    """

    weight_bits: int | None = 8
    act_bits: int | None = 8
    weight_granularity: str = "channel"
    act_granularity: str = "tensor"
    weight_symmetric: bool = False
    act_symmetric: bool = False
    attn_bits: int | str | None = "act"
    softmax_bits: int | str | None = "act"
    keep_fp: tuple[str, ...] | None = None
    split_shortcut: bool = True
    weight_init: str = "mse"
    act_init: str = "mse"
    percentile: float = 99.99
    format_version: int = FORMAT_VERSION

    WHAT = "quantization config"

    def __post_init__(self) -> None:
        self.weight_bits = _norm_bits("weight_bits", self.weight_bits)
        self.act_bits = _norm_bits("act_bits", self.act_bits)
        self.attn_bits = _norm_bits("attn_bits", self.attn_bits, allow_act=True)
        self.softmax_bits = _norm_bits("softmax_bits", self.softmax_bits, allow_act=True)
        if self.weight_granularity not in GRANULARITIES:
            raise ConfigError(f"weight_granularity: expected one of {GRANULARITIES}, got {self.weight_granularity!r}")
        if self.act_granularity != "tensor":
            raise ConfigError(f"act_granularity: only 'tensor' is supported, got {self.act_granularity!r}")
        for name in ("weight_symmetric", "act_symmetric", "split_shortcut"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        for name in ("weight_init", "act_init"):
            if getattr(self, name) not in INIT_METHODS:
                raise ConfigError(f"{name}: expected one of {INIT_METHODS}, got {getattr(self, name)!r}")
        if self.keep_fp is not None:
            if isinstance(self.keep_fp, str) or not all(isinstance(p, str) for p in self.keep_fp):
                raise ConfigError(f"keep_fp: expected a list of module-name patterns, got {self.keep_fp!r}")
            self.keep_fp = tuple(self.keep_fp)
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"percentile: expected a value in (50, 100], got {self.percentile!r}")
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(f"format_version: this accuquant reads version {FORMAT_VERSION}, got {self.format_version!r}")

    # Effective bit widths of the attention matmul inputs.
    @property
    def resolved_attn_bits(self) -> int | None:
        return self.act_bits if self.attn_bits == "act" else self.attn_bits

    @property
    def resolved_softmax_bits(self) -> int | None:
        return self.act_bits if self.softmax_bits == "act" else self.softmax_bits

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["keep_fp"] = None if self.keep_fp is None else list(self.keep_fp)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown quantization config field")
        return cls(**d)
