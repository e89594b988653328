"""Resumable calibration: the state of every quantizer, saved after each finished unit of work.

A checkpoint is one safetensors file: for each quantizer its step size, zero point and,
when learned rounding is on, its rounding variables, or its integer codes when they are
fixed; the metadata says how far the
method got (``done``), under which settings (``key``), and the SHA-256 of every tensor
(``sha256``), which resuming verifies. Writing is atomic (written beside, flushed to the
disk, renamed), so an interruption leaves the previous checkpoint intact. A method that resumes loads the
quantizers and skips the finished units; with per-unit seeds the result is the same as
an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import AccuQuantError
from ..quant.layers import all_quantizers, outlier_parameters, quant_layers
from .files import atomic_path

FORMAT = "accuquant.checkpoint/3"


def save_checkpoint(path: Path, model: nn.Module, key: str, done: int, extra: dict | None = None,
                    tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Save every quantizer of ``model`` and its layers' outlier transforms, the progress
    marker ``done``, JSON ``extra`` and the method's own ``tensors`` (optimiser state...)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()}
    for name, q in all_quantizers(model).items():
        tensors[f"{name}.scale"] = q.scale.detach().cpu().contiguous()
        tensors[f"{name}.zero_point"] = q.zero_point.detach().cpu().contiguous()
        if q.alpha is not None:
            tensors[f"{name}.alpha"] = q.alpha.detach().cpu().contiguous()
        if q.codes is not None:
            tensors[f"{name}.codes"] = q.codes.cpu().contiguous()
    for name, p in outlier_parameters(quant_layers(model)).items():  # smoothing scales, branch factors
        tensors[name] = p.detach().cpu().contiguous()
    meta = {"format": FORMAT, "key": key, "done": str(done), "extra": json.dumps(extra or {}),
            "sha256": checksum(tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_checkpoint(path: Path, key: str) -> tuple[int, dict, dict] | None:
    """``(done, tensors, extra)`` of the checkpoint at ``path`` if it was written under ``key``."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT or meta.get("key") != key:
            return None
        tensors = load_file(str(path))
        if checksum(tensors) != meta.get("sha256"):
            raise ValueError("its tensors do not match their checksum")
        return int(meta["done"]), tensors, json.loads(meta.get("extra", "{}"))
    except Exception as e:  # a damaged file: say so rather than resume from garbage
        raise AccuQuantError(f"{path}: unreadable checkpoint ({e}); delete it to start over") from None


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def load_quantizers(model: nn.Module, tensors: dict) -> None:
    """Set every quantizer of ``model`` from checkpoint tensors; learned rounding is restored
    as hard rounding (it is only saved for finished units)."""
    for name, q in all_quantizers(model).items():
        q.scale.data.copy_(tensors[f"{name}.scale"].to(q.scale.device))
        q.zero_point.copy_(tensors[f"{name}.zero_point"].to(q.zero_point.device))
        alpha = tensors.get(f"{name}.alpha")
        if alpha is not None:
            q.alpha = nn.Parameter(alpha.to(q.scale.device), requires_grad=False)
            q.soft_rounding = False
        else:
            q.alpha = None
        codes = tensors.get(f"{name}.codes")
        q.codes = None if codes is None else codes.to(device=q.scale.device, dtype=torch.int16)
    for name, p in outlier_parameters(quant_layers(model)).items():
        p.data.copy_(tensors[name].to(p.device))
