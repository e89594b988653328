"""Safetensors files beyond ``safetensors.torch``: the header read once here, checks of a
file's integrity, a writer that fills a file batch by batch, and a reader that maps a
file instead of copying it."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from ..errors import AccuQuantError


def read_header(path: Path) -> tuple[int, dict]:
    """The header's length and the header (``__metadata__`` included) of a safetensors file;
    ``ValueError`` when the file is shorter than its header says."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than its header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError("header runs past the end of the file")
        return n, json.loads(f.read(n))


def check_safetensors(path: Path) -> None:
    """Refuse a missing, truncated or corrupt safetensors file with a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise AccuQuantError(f"{path}: no such file")
    size = path.stat().st_size
    try:
        n, header = read_header(path)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError(f"expected {8 + n + end} bytes, found {size}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise AccuQuantError(f"{path}: corrupt or truncated safetensors file ({e})") from None


class RowFile:
    """A safetensors file written in place: the header first (every shape is known before
    sampling), then each batch's rows of the large tensors where they belong, so that a
    collection holds one batch at a time however many trajectories it makes."""

    def __init__(self, path: Path, large: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 small: dict[str, torch.Tensor], metadata: dict[str, str]):
        entries = [(k, dt, tuple(shape)) for k, (dt, shape) in large.items()]
        entries += [(k, t.dtype, tuple(t.shape)) for k, t in small.items()]
        entries.sort(key=lambda e: -torch.empty((), dtype=e[1]).element_size())  # each tensor aligned to its type
        codes = {v: k for k, v in DTYPES.items()}
        header, offset = {}, 0
        for name, dt, shape in entries:
            size = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            header[name] = {"dtype": codes[dt], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = metadata
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.base, self.header = 8 + len(text), header
        self.fd = os.open(path, os.O_WRONLY)
        os.write(self.fd, struct.pack("<Q", len(text)) + text)
        os.ftruncate(self.fd, self.base + offset)
        for name, t in small.items():
            self.write(name, 0, t)

    def write(self, name: str, row: int, t: torch.Tensor) -> None:
        """``t`` as the rows of tensor ``name`` from ``row`` on."""
        data = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        row_bytes = len(data) // max(1, t.shape[0]) if t.dim() else 0
        at = self.base + self.header[name]["data_offsets"][0] + row * row_bytes
        while data:
            n = os.pwrite(self.fd, data, at)
            data, at = data[n:], at + n

    def close(self) -> None:
        os.close(self.fd)


DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def map_file(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of a safetensors file as views of the file mapped copy-on-write (``None``
    when a tensor's dtype or alignment does not allow it: the caller reads the file)."""
    n, header = read_header(path)
    size = path.stat().st_size
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(info["dtype"])
        start, _ = info["data_offsets"]
        start += 8 + n
        if dtype is None:
            return None
        item = torch.empty((), dtype=dtype).element_size()
        if start % item:
            return None
        out[name] = torch.empty(0, dtype=dtype).set_(storage, start // item, tuple(info["shape"]))
    return out
