"""What a calibration method implements, and what the engine gives it.

A method (:mod:`accuquant.methods`) is a :class:`Method`: its :attr:`~Method.Config`
(the options), ``initialise(run)`` and ``units(run)``. A :class:`Unit` of work (per-step's
blocks; AccuQuant's one unit over the trajectory) opens into :class:`Phase` objects, each
``iters`` optimisation steps of some :class:`Group` of parameters on a loss. The engine
(:mod:`accuquant.calibrate.loop`) runs them all, so methods differ only in their
objective, initialisation and learnable parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch

from ..config import DEFAULT_BATCH_SIZE, MethodConfig, QuantConfig
from ..models import Denoiser
from ..sampling import Solver
from .block_data import DEFAULT_MAX_BYTES
from .data import Trajectories
from .distributed import shard


@dataclass
class Run:
    """One calibration: the wrapped denoiser, the solver, the FP trajectories, and where
    the engine keeps its state."""

    denoiser: Denoiser
    solver: Solver
    calib: Trajectories
    config: QuantConfig
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str | torch.device = "cpu"
    progress: bool = True
    seed: int = 0
    #: checkpoint file (``None``: none written) and whether to continue from it
    checkpoint: Path | None = None
    resume: bool = False
    #: settings hash a checkpoint must carry to be resumed
    key: str = ""
    #: hash of model, config, data and seed (no method), and where results of default
    #: options are kept under it for later runs (``None``: keep none)
    base_key: str = ""
    result_cache: Path | None = None
    #: what the method reports, kept with the quantized model
    log: dict = field(default_factory=dict)
    #: passes per batch (gradient accumulation: each computes the loss on a piece of it)
    micro_batches: int = 1
    #: the current pass and this rank's share of the rows of the current batch (see :meth:`shard`)
    part: int = 0
    share: float = 1.0
    #: bytes of captured block data kept in RAM (per-step); the rest goes to files under
    #: ``spill_dir`` (default: the system's temporary folder). Where data is kept never
    #: changes the result, so neither is part of a key.
    max_memory: int = DEFAULT_MAX_BYTES
    spill_dir: str | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.denoiser.model

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a batch drawn by a loss (all of them in one process); the
        engine weights this rank's gradient by their share when it combines them."""
        idx, self.share = shard(idx, self.part, self.micro_batches)
        return idx

    def trajectories(self, idx: torch.Tensor):
        """Stored FP trajectories ``idx`` on the run's device: samples, model outputs, conditions."""
        return (self.calib.xs[idx].to(self.device), self.calib.outs[idx].to(self.device),
                self.calib.cond.index(idx).to(self.device))


@dataclass
class Group:
    """Parameters optimised together: ``lr`` is absolute, or (``relative``) a fraction of
    each element's initial magnitude per step; relative parameters are kept positive."""

    params: dict[str, torch.Tensor]
    lr: float
    relative: bool = False


@dataclass
class Phase:
    """``iters`` optimisation steps of the parameters ``groups(resumed)`` returns (called
    when the phase starts; ``resumed``: its state comes from a checkpoint), on
    ``loss(generator, iteration)``: a tensor to back-propagate, or a float when the loss
    has accumulated its gradients itself. ``end`` runs when the phase is over."""

    name: str
    iters: int
    groups: Callable[[bool], list[Group]]
    loss: Callable[[torch.Generator, int], "torch.Tensor | float"]
    end: Callable[[], None] | None = None
    save_every: int | None = None
    curve: bool = False  # log the mean loss of every 10 iterations as ``loss_curve``


@dataclass
class Unit:
    """A unit of work: ``open(index)`` prepares it (per-step: captures the block's data)
    and yields its phases; ``iters`` is their total, for the progress bar."""

    name: str
    iters: int
    open: Callable[[int], ContextManager[list[Phase]]]


class Method:
    """Base of the methods: ``initialise`` (not called when resuming) and ``units``.
    A method registers itself with :func:`accuquant.methods.register_method`."""

    Config: type[MethodConfig] = MethodConfig

    def __init__(self, config: MethodConfig):
        self.config = config

    def initialise(self, run: Run) -> None:
        pass

    def units(self, run: Run) -> list[Unit]:
        return []
