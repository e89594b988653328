"""Integer weight codes packed into bytes: four per byte at 2 bits, two at 3 and 4 bits,
one at 5 to 8, little end first. Frozen layers hold their codes this way in memory and on
disk, so a 4-bit model takes an eighth of its float32 weights."""

from __future__ import annotations

import math

import torch


def slot_bits(bits: int) -> int:
    """Bits each code takes in a byte at ``bits``: 2, 4 or 8."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (< 2^bits, any shape) packed into a 1-D uint8 tensor, ``8 // slot`` per byte."""
    slot = slot_bits(bits)
    per = 8 // slot
    flat = codes.reshape(-1).to(torch.uint8)
    if per == 1:
        return flat.clone()
    pad = (-flat.numel()) % per
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per)
    packed = flat[:, 0].clone()
    for k in range(1, per):
        packed |= flat[:, k] << (slot * k)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The uint8 codes of ``shape`` that :func:`pack_codes` packed."""
    slot = slot_bits(bits)
    per = 8 // slot
    n = math.prod(shape)
    if per == 1:
        return packed[:n].reshape(shape).clone()
    mask = (1 << slot) - 1
    parts = torch.stack([(packed >> (slot * k)) & mask for k in range(per)], dim=1).reshape(-1)
    return parts[:n].reshape(shape)


def _offset(codes: torch.Tensor, offsets: list[int], split: int | None) -> torch.Tensor:
    parts = [codes] if split is None else [codes[:, :split], codes[:, split:]]
    return torch.cat([p + o for p, o in zip(parts, offsets)], dim=1)


def pack_signed(codes: torch.Tensor, qmins: list[int], split: int | None, bits: int) -> torch.Tensor:
    """A weight's integer codes, each part (cut at input channel ``split``) in its own
    ``[qmin, qmax]``, packed as ``q - qmin`` (what frozen layers hold and save)."""
    return pack_codes(_offset(codes, [-m for m in qmins], split), bits)


def unpack_signed(packed: torch.Tensor, qmins: list[int], split: int | None, bits: int,
                  shape: tuple[int, ...]) -> torch.Tensor:
    """The integer codes (int16) that :func:`pack_signed` packed."""
    return _offset(unpack_codes(packed, bits, shape).to(torch.int16), qmins, split)


def packed_numel(bits: int, shape: tuple[int, ...]) -> int:
    """Bytes :func:`pack_codes` takes for codes of ``shape`` at ``bits``."""
    per = 8 // slot_bits(bits)
    return -(-math.prod(shape) // per)
