"""Checks on files we read, and writes that never leave a half-written result behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from .errors import AccuQuantError


def check_safetensors(path: Path) -> None:
    """Refuse a missing, truncated or corrupt safetensors file with a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise AccuQuantError(f"{path}: no such file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError("header runs past the end of the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError(f"expected {8 + n + end} bytes, found {size}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise AccuQuantError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def check_device(device: str) -> None:
    """Refuse a device that is not ``cpu``, ``cuda`` or an existing ``cuda:N``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise AccuQuantError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AccuQuantError("--device cuda: no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise AccuQuantError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")


def check_finite(model: torch.nn.Module, what: str) -> None:
    """Refuse weights holding NaN or inf."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
            raise AccuQuantError(f"{what}: weights contain NaN or inf (first in {name})")


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary file path beside ``path``; it replaces ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output directory that exists and is not empty, unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AccuQuantError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise AccuQuantError(f"{out}: directory exists and is not empty (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False):
    """Yield a temporary directory beside ``out``; it becomes ``out`` only on success."""
    out = Path(out)
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "x")
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old / "x", out)  # put the old output back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
