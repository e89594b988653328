"""Everything the package caches, and the keys it caches it under: every cache directory
and key recipe is here.

* :func:`cache_dir`: ``$ACCUQUANT_CACHE`` (default ``~/.cache/accuquant``), with ``calib/``
  (FP trajectories: :func:`trajectories_path`), ``samples/`` (FP samples:
  :func:`samples_path`), ``results/`` (methods' results that later runs start from:
  :class:`ResultStore`) and ``runs/`` (checkpoints of unfinished calibrations:
  :func:`checkpoint_path`).
* :func:`fingerprint`: a hash of a model's class, config and weights, computed once per
  model object.
* :func:`digest`: a short key over JSON-able settings and tensors; every key includes
  :data:`LAYOUT`, so entries written under another layout are never taken.
* :func:`run_keys`: the keys of one calibration (its checkpoint's, and the base of its
  results' keys).
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

from .io.checkpoint import load_quantizers, read_checkpoint, save_checkpoint

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
    guidance and the per-sample conditions (a :class:`~accuquant.models.Conditions`)."""
    items = list(cond.items())
    return digest({"model": fingerprint, "solver": solver_desc, "num": num, "seed": seed, "g": guidance,
                   "cond": [k for k, _ in items]}, *(v for _, v in items))


def pipeline_key(model_fingerprint: str, defaults: dict) -> str:
    """The key of a pipeline: its denoiser's :func:`fingerprint` and its sampling defaults."""
    return digest({"model": model_fingerprint, "defaults": defaults})


def trajectories_path(key: str) -> Path:
    """Where a set of FP calibration trajectories with :func:`settings_key` ``key`` is kept."""
    return cache_dir() / "calib" / f"{key}.safetensors"


def samples_path(key: str) -> Path:
    """Where a set of FP samples with :func:`settings_key` ``key`` is kept."""
    return cache_dir() / "samples" / f"{key}.safetensors"


def checkpoint_path(run_key: str) -> Path:
    """The checkpoint of an unfinished calibration with run key ``run_key``."""
    return cache_dir() / "runs" / f"{run_key}.safetensors"


def results_dir() -> Path:
    return cache_dir() / "results"


def run_keys(fingerprint: str, config: dict, method: dict, calib_digest: str, seed: int, batch_size: int,
             guidance_scale: float) -> tuple[str, str]:
    """The run key (names the checkpoint: everything the result depends on, ``method``
    being the method config without its learning rates, so that a diverged run may be
    resumed with a smaller one) and the base key (the same without the method: names
    results that other methods start from)."""
    common = {"model": fingerprint, "config": config, "seed": seed, "batch_size": batch_size,
              "g": guidance_scale, "calib": calib_digest}
    return digest({**common, "method": method}), digest(common)


def result_key(base_key: str, config) -> str:
    """The key of the result of method config ``config`` under a run's ``base_key`` (options
    other than the defaults are part of it)."""
    extra = {} if config.is_default() else {"options": config.to_dict()}
    return digest({"base": base_key, "method": config.NAME, "version": config.VERSION, **extra})


class ResultStore:
    """Methods' results (every quantizer's state) under ``root``, keyed by :func:`result_key`;
    ``root`` or ``base_key`` empty: a store that keeps nothing."""

    def __init__(self, root: Path | None, base_key: str):
        self.root, self.base_key = root, base_key

    def _entry(self, config) -> tuple[str, Path | None]:
        key = result_key(self.base_key, config)
        return key, (self.root / f"{key}.safetensors" if self.root is not None and self.base_key else None)

    def load(self, model: torch.nn.Module, config) -> dict | None:
        """Set ``model``'s quantizers to ``config``'s stored result and return its log (with
        ``cached: True``), or return ``None`` when there is none."""
        key, path = self._entry(config)
        state = read_checkpoint(path, key) if path is not None else None
        if state is None:
            return None
        try:
            load_quantizers(model, state[1])
        except KeyError:  # kept before entries held the layers' outlier transforms: made again
            path.unlink(missing_ok=True)
            return None
        return {**state[2], "cached": True}

    def save(self, model: torch.nn.Module, config, log: dict) -> None:
        """Keep ``model``'s quantizers as ``config``'s result. An entry that exists stays: runs
        that share a starting point must share exactly the same one (another thread count
        can flip a learned rounding)."""
        key, path = self._entry(config)
        if path is not None and not path.exists():
            save_checkpoint(path, model, key, 1, extra=log)
