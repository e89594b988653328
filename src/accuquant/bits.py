"""Bit widths: parsed from ints or text, and their labels (``w4a8``)."""

from __future__ import annotations

import re
from typing import Any

from .errors import ConfigError

#: bit widths that mean "keep this tensor in floating point"
FLOAT_BITS = (16, 32)
_FLOAT_WORDS = ("none", "fp", "float")


def parse_bits(value: Any, name: str = "bits", allow_act: bool = False) -> int | str | None:
    """A bit width from an int or text: 2..8, ``None`` for floating point (also 16, 32,
    ``"none"``, ``"fp"``, ``"float"``), or ``"act"`` (the activation bits) where allowed."""
    if isinstance(value, str):
        text = value.strip().lower()
        if allow_act and text == "act":
            return "act"
        if text in _FLOAT_WORDS:
            return None
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{name}: expected a bit width (2 to 8, 16/32 or none), got {value!r}") from None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer bit width, got {value!r}")
    if value in FLOAT_BITS:
        return None
    if not 2 <= value <= 8:
        raise ConfigError(f"{name}: {value} bits is out of range (2 to 8, or 16/32/none for floating point)")
    return value


def bits_label(weight_bits: int | None, act_bits: int | None) -> str:
    """``w4a8``; ``fp`` for a part kept in floating point (``w4afp``)."""
    return f"w{weight_bits or 'fp'}a{act_bits or 'fp'}"


_LABEL = re.compile(r"^w(\w+?)a(\w+)$")


def parse_bits_label(text: str) -> tuple[int | None, int | None]:
    """``"w4a8"`` -> ``(4, 8)``, the inverse of :func:`bits_label`."""
    m = _LABEL.match(text.strip().lower())
    if not m:
        raise ConfigError(f"bit widths {text!r}: not of the form w<bits>a<bits> (e.g. w4a8)")
    return parse_bits(m.group(1), "weight bits"), parse_bits(m.group(2), "activation bits")
