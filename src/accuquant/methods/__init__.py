"""Calibration methods, registered by name.

Every method runs in the same engine (:func:`accuquant.engine.quantize`): the model is
wrapped, every method starts from the naive ranges, and the method then improves the
quantizers by its own objective. A method is a function ``calibrate(ctx)`` taking a
:class:`CalibrationContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..adapters import Denoiser
from ..calibration import Trajectories
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


def method_options(ctx: CalibrationContext, defaults: dict) -> dict:
    """The method's options: ``defaults`` updated by ``ctx.options``; unknown names are refused."""
    unknown = sorted(set(ctx.options) - set(defaults))
    if unknown:
        raise AccuQuantError(f"unknown option(s) {', '.join(unknown)}; this method takes: {', '.join(sorted(defaults))}")
    return {**defaults, **{k: v for k, v in ctx.options.items() if v is not None}}


METHODS: dict[str, Callable[[CalibrationContext], None]] = {}


def register_method(name: str):
    def deco(fn):
        METHODS[name] = fn
        return fn

    return deco


def get_method(name: str) -> Callable[[CalibrationContext], None]:
    if name not in METHODS:
        raise AccuQuantError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


from . import naive, per_step  # noqa: E402,F401  (registers the built-in methods)
