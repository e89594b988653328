"""Calibration methods, registered by name.

Every method runs in the same engine (:func:`accuquant.engine.quantize`): the model is
wrapped, every method starts from the naive ranges, and the method then improves the
quantizers by its own objective. A method is a function ``calibrate(ctx)`` taking a
:class:`CalibrationContext`.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..adapters import Denoiser
from ..calibration import Trajectories
from ..checkpoint import load_quantizers, read_checkpoint, save_checkpoint
from ..config import QuantConfig
from ..errors import AccuQuantError
from ..sampling import Solver


@dataclass
class CalibrationContext:
    """What a method gets: the (wrapped) denoiser, the solver, the FP trajectories."""

    denoiser: Denoiser
    solver: Solver
    calib: Trajectories
    config: QuantConfig
    batch_size: int = 32
    device: str | torch.device = "cpu"
    progress: bool = True
    seed: int = 0
    options: dict = field(default_factory=dict)
    #: where a resumable method saves its progress (``None``: not saved), and whether to
    #: continue from what is there
    checkpoint: Path | None = None
    resume: bool = False
    #: settings hash a checkpoint must carry to be resumed
    run_key: str = ""
    #: what the method reports (per-block losses...), kept with the quantized model
    log: dict = field(default_factory=dict)
    #: hash of the model, config, calibration data, seed and batch size (no method), and a
    #: folder where a method may keep results worth reusing under it (``None``: keep none)
    base_key: str = ""
    result_cache: Path | None = None


@contextmanager
def weights_frozen(model: torch.nn.Module):
    """The model's own parameters take no gradient inside (a learning method trains only
    its quantizers' parameters); their flags are restored afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


def result_key(ctx: CalibrationContext, method: str) -> str:
    """The cache key of ``method``'s result with its default options in this context (and
    the method's version, so that a result of an older version is not taken)."""
    version = key_version(method)
    tag = f"{ctx.base_key}:{method}" + (f":v{version}" if version is not None else "")
    return hashlib.sha256(tag.encode()).hexdigest()[:24]


def load_cached_result(ctx: CalibrationContext, method: str) -> dict | None:
    """Set the quantizers to ``method``'s cached result (default options, same model, config,
    data and seed) and return its log, or return ``None`` when there is none."""
    if ctx.result_cache is None or not ctx.base_key:
        return None
    key = result_key(ctx, method)
    state = read_checkpoint(ctx.result_cache / f"{key}.safetensors", key)
    if state is None:
        return None
    load_quantizers(ctx.denoiser.model, state[1])
    return state[2]


def save_result(ctx: CalibrationContext, method: str, log: dict) -> None:
    """Keep the quantizers as ``method``'s result for :func:`load_cached_result`. An entry
    that exists stays: the result is deterministic only up to float rounding (another
    thread count can flip a learned rounding), and runs that share a starting point must
    share exactly the same one."""
    if ctx.result_cache is not None and ctx.base_key:
        key = result_key(ctx, method)
        path = ctx.result_cache / f"{key}.safetensors"
        if not path.exists():
            save_checkpoint(path, ctx.denoiser.model, key, 1, extra=log)


def _check_options(name: str, options: dict, defaults: dict) -> None:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise AccuQuantError(f"method {name!r}: unknown option(s) {', '.join(unknown)}; it takes: "
                             f"{', '.join(sorted(defaults)) or 'none'}")


def method_options(ctx: CalibrationContext, defaults: dict, name: str = "") -> dict:
    """The method's options: ``defaults`` updated by ``ctx.options``; unknown names are refused."""
    _check_options(name, ctx.options, defaults)
    return {**defaults, **{k: v for k, v in ctx.options.items() if v is not None}}


METHODS: dict[str, Callable[[CalibrationContext], None]] = {}
METHOD_OPTIONS: dict[str, dict] = {}
METHOD_VERSIONS: dict[str, int] = {}


def key_version(method: str) -> int | None:
    """The method's version as it enters run and cache keys: ``None`` for version 1, so that
    keys made before methods had versions stay valid."""
    version = METHOD_VERSIONS.get(method, 1)
    return None if version == 1 else version


def register_method(name: str, options: dict | None = None, version: int = 1):
    """Register ``calibrate(ctx)`` as method ``name``; ``options`` are its option defaults;
    ``version`` goes up when the same options give another result (it is part of the run
    key, so a checkpoint of an older version is not resumed)."""

    def deco(fn):
        METHODS[name] = fn
        METHOD_OPTIONS[name] = dict(options or {})
        METHOD_VERSIONS[name] = version
        return fn

    return deco


def check_method_options(name: str, options: dict) -> None:
    """Refuse options that method ``name`` does not take (before any long work)."""
    get_method(name)
    _check_options(name, options, METHOD_OPTIONS[name])


def get_method(name: str) -> Callable[[CalibrationContext], None]:
    if name not in METHODS:
        raise AccuQuantError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


from . import accuquant, naive, per_step  # noqa: E402,F401  (registers the built-in methods)
