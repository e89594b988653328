"""Everything the package caches, and the keys it caches it under.

* :func:`cache_dir`: ``$ACCUQUANT_CACHE`` (default ``~/.cache/accuquant``), with ``calib/``
  (FP trajectories), ``samples/`` (FP samples), ``results/`` (default-option results that
  later runs start from) and ``runs/`` (checkpoints of unfinished calibrations).
* :func:`fingerprint`: a hash of a model's class, config and weights, computed once per
  model object.
* :func:`digest`: a short key over JSON-able settings and tensors; every key includes
  :data:`LAYOUT`, so entries written under another layout are never taken.
* :func:`derive_seed`: the seed of one named random stream (a sample's noise, a unit
  of calibration work), independent of batching and of what ran before.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from pathlib import Path

import torch

#: Version of the cache layout and key recipe; part of every key.
LAYOUT = "accuquant.cache/2"

_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def cache_dir() -> Path:
    """``$ACCUQUANT_CACHE``, else ``$XDG_CACHE_HOME/accuquant``, else ``~/.cache/accuquant``."""
    root = os.environ.get("ACCUQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "accuquant"
    )
    return Path(root)


def derive_seed(tag: str, seed: int, index) -> int:
    """A 63-bit seed for stream ``index`` of ``(tag, seed)``."""
    h = hashlib.sha256(f"{tag}:{seed}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def fingerprint(model: torch.nn.Module) -> str:
    """A hash of ``model``'s class, config and every tensor, computed on the first call for
    this object and remembered (call :func:`forget` after changing the model in place)."""
    fp = _FINGERPRINTS.get(model)
    if fp is None:
        h = hashlib.sha256(type(model).__name__.encode())
        # diffusers' private entries (``_use_default_values``: a list in set order, which
        # differs between processes; ``_name_or_path``) say nothing about the model
        config = {k: v for k, v in dict(getattr(model, "config", {})).items() if not k.startswith("_")}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        fp = _FINGERPRINTS[model] = h.hexdigest()
    return fp


def forget(model: torch.nn.Module) -> None:
    """Drop the remembered fingerprint of ``model`` (it was changed in place)."""
    _FINGERPRINTS.pop(model, None)


def digest(settings, *tensors: torch.Tensor) -> str:
    """A 24-hex-digit key over JSON-able ``settings`` and the bytes of ``tensors``."""
    h = hashlib.sha256(LAYOUT.encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def settings_key(fingerprint: str, solver_desc: dict, num: int, seed: int, guidance: float, cond) -> str:
    """The key of a set of samples (trajectories, FP samples): model, solver, count, seed,
    guidance and the per-sample conditions (a :class:`~accuquant.adapters.Conditions`)."""
    items = list(cond.items())
    return digest({"model": fingerprint, "solver": solver_desc, "num": num, "seed": seed, "g": guidance,
                   "cond": [k for k, _ in items]}, *(v for _, v in items))
