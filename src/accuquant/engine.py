"""The calibration engine: the one loop every learning method runs in.

A method (:mod:`accuquant.methods`) supplies its initialisation, its units of work
(per-step's blocks; AccuQuant's one unit over the trajectory, whose iterations each
simulate one group of steps) and, per unit, its phases: the learnable parameters and
the loss on a batch. The engine owns everything else:

* a random generator per unit, seeded by (method, seed, unit index), from which every
  batch of the unit is drawn, so a run's result does not depend on where it resumed;
* one optimiser (:class:`Adam`, with a rate relative to each step size's initial value
  where asked) and the one place where gradients are combined before a step: under
  ``torch.distributed`` (:mod:`accuquant.distributed`) each rank computes the loss on its
  rows of the batch (:meth:`Run.shard`), in ``micro_batches`` passes if asked
  (gradient accumulation), and the gradients are summed there, weighted by each
  piece's share of the rows, so every rank takes the step one process would;
* checkpoints (written by rank 0 only) after the initialisation, after every unit and every ``save_every``
  iterations of a phase (quantizers, optimiser and generator state, the log), and
  resume from them;
* the progress bar with the current loss, the log, and the count of denoiser evaluations;
* starting from another method's result, cached per model, config, data and seed
  (:func:`start_from`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch

from .adapters import Denoiser
from .cache import derive_seed, digest
from .calibration import Trajectories
from .checkpoint import load_quantizers, read_checkpoint, save_checkpoint
from .config import QuantConfig
from .distributed import active, is_main, shard, sum_over_ranks
from .errors import DivergenceError
from .methods.base import MethodConfig, method_class, options_of
from .progress import progress_bar
from .sampling import Solver


@dataclass
class Run:
    """One calibration: the wrapped denoiser, the solver, the FP trajectories, and where
    the engine keeps its state."""

    denoiser: Denoiser
    solver: Solver
    calib: Trajectories
    config: QuantConfig
    batch_size: int = 32
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
    max_memory: int = 2 * 2**30
    spill_dir: str | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.denoiser.model

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a batch drawn by a loss (all of them in one process); the
        engine weights this rank's gradient by their share when it combines them."""
        idx, self.share = shard(idx, self.part, self.micro_batches)
        return idx


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
    #: the rate over the phase: ``"constant"``, or ``"cosine"`` (from the full rate down to
    #: zero at the last iteration)
    decay: str = "constant"
    #: the parameters end as the mean of the iterates of this last fraction of the
    #: iterations (0: the last iterate), which damps the noise of the last batches
    average: float = 0.0
    #: keep the best iterate: ``score()`` (lower is better; every rank must compute the same
    #: value) of the starting point and of every ``score_every``-th iterate, and of the last;
    #: the phase ends on the best of them (logged as ``scores`` and ``chosen_iterate``)
    score: Callable[[], float] | None = None
    score_every: int = 0

    def rate(self, it: int) -> float:
        """The multiplier of the learning rates at iteration ``it``."""
        if self.decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * it / self.iters))
        return 1.0

    def averaged_from(self) -> int:
        """The first iteration whose iterate enters the average (``iters``: none does)."""
        return self.iters - int(round(self.average * self.iters))


@dataclass
class Unit:
    """A unit of work: ``open(index)`` prepares it (per-step: captures the block's data)
    and yields its phases; ``iters`` is their total, for the progress bar."""

    name: str
    iters: int
    open: Callable[[int], ContextManager[list[Phase]]]


class Method:
    """Base of the methods: ``initialise`` (not called when resuming) and ``units``."""

    Config: type[MethodConfig] = MethodConfig

    def __init__(self, config: MethodConfig):
        self.config = config

    def initialise(self, run: Run) -> None:
        pass

    def units(self, run: Run) -> list[Unit]:
        return []


class Adam:
    """Adam with torch's arithmetic (``torch.optim.Adam``'s single-tensor path: the same
    floats on the CPU), per-parameter state, and optionally relative rates."""

    def __init__(self, groups: list[Group], betas=(0.9, 0.999), eps: float = 1e-8):
        self.groups, self.betas, self.eps = groups, betas, eps
        self.state = {}
        for g in groups:
            for name, p in g.params.items():
                ref = p.detach().abs().clamp_min(1e-8) if g.relative else None
                self.state[name] = {"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p), "ref": ref}

    @torch.no_grad()
    def step(self, rate: float = 1.0) -> None:
        """One step, every learning rate multiplied by ``rate``."""
        b1, b2 = self.betas
        for g in self.groups:
            for name, p in g.params.items():
                if p.grad is None:
                    continue
                s = self.state[name]
                s["step"] += 1
                s["m"].lerp_(p.grad, 1 - b1)
                s["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                bc1, bc2 = 1 - b1 ** float(s["step"]), 1 - b2 ** float(s["step"])
                denom = (s["v"].sqrt() / bc2**0.5).add_(self.eps)
                ref = s["ref"]
                if ref is None or ref.numel() == 1:
                    lr = rate * g.lr * (float(ref) if ref is not None else 1.0)
                    p.addcdiv_(s["m"], denom, value=-(lr / bc1))
                else:
                    p.addcdiv_(s["m"] * ref, denom, value=-(rate * g.lr / bc1))
                if g.relative:
                    p.clamp_(min=1e-8)

    def zero_grad(self) -> None:
        for g in self.groups:
            for p in g.params.values():
                p.grad = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, s in self.state.items():
            out[f"adam.{name}.step"] = torch.tensor(s["step"])
            out[f"adam.{name}.m"], out[f"adam.{name}.v"] = s["m"], s["v"]
            if s["ref"] is not None:
                out[f"adam.{name}.ref"] = s["ref"]
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, s in self.state.items():
            s["step"] = int(tensors[f"adam.{name}.step"])
            s["m"], s["v"] = (tensors[f"adam.{name}.{k}"].to(s["m"]).clone() for k in ("m", "v"))
            if s["ref"] is not None:
                s["ref"] = tensors[f"adam.{name}.ref"].to(s["ref"]).clone()


@contextmanager
def weights_frozen(model: torch.nn.Module):
    """The model's own parameters take no gradient inside (methods learn quantizer
    parameters only); their flags are restored afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


@dataclass
class _Position:
    unit: int = 0
    phase: int = 0
    iteration: int = 0

    def encode(self) -> str:
        return f"{self.unit}.{self.phase}.{self.iteration}"

    @classmethod
    def decode(cls, text: str) -> "_Position":
        return cls(*(int(v) for v in text.split(".")))


def _save(run: Run, pos: _Position, tensors: dict | None = None) -> None:
    if run.checkpoint is not None and is_main():
        save_checkpoint(run.checkpoint, run.model, run.key, pos.unit, extra={"log": run.log, "at": pos.encode()},
                        tensors=tensors)


def calibrate(run: Run, config: MethodConfig) -> None:
    """Run method ``config`` on ``run``: initialise (or resume from the checkpoint), then
    every unit's phases; the quantizers end calibrated, the log in ``run.log``."""
    method = method_class(config.NAME)(config)
    state = read_checkpoint(run.checkpoint, run.key) if (run.resume and run.checkpoint) else None
    with weights_frozen(run.model):
        if state is None:
            pos, tensors = _Position(), {}
            method.initialise(run)
        else:
            _, tensors, extra = state
            load_quantizers(run.model, tensors)
            run.log.update(extra.get("log", {}))
            pos = _Position.decode(extra["at"])
            run.log["resumed_at"] = dataclasses.asdict(pos)
        units = method.units(run)
        if units:
            if state is None:
                _save(run, pos)
            _run_units(run, method, units, pos, tensors)


def _run_units(run: Run, method: Method, units: list[Unit], pos: _Position, tensors: dict) -> None:
    t0 = time.perf_counter()
    name = method.config.NAME
    with progress_bar(sum(u.iters for u in units), name, disable=not run.progress) as bar:
        bar.update(sum(u.iters for u in units[: pos.unit]))
        for u in range(pos.unit, len(units)):
            unit, here = units[u], u == pos.unit
            gen = torch.Generator().manual_seed(derive_seed(name, run.seed, u))
            if here and "engine.generator" in tensors:
                gen.set_state(tensors["engine.generator"])
            label = f"{name} {unit.name}" if len(units) > 1 else name
            bar.set_description(label)
            with unit.open(u) as phases:
                for p in range(pos.phase if here else 0, len(phases)):
                    at = _Position(u, p, pos.iteration if here and p == pos.phase else 0)
                    _run_phase(run, phases[p], gen, at, tensors if at.iteration else None, bar, label)
            _save(run, _Position(u + 1))
    run.log["seconds"] = round(time.perf_counter() - t0, 2)


def _check_finite(where: str, loss: float, groups: list[Group], what: str) -> None:
    """Stop at the first non-finite loss, gradient (``what="gradient"``) or parameter."""
    def stop(quantity: str):
        raise DivergenceError(f"{where}: {quantity} is not finite; stopped there, the last checkpoint is kept "
                              "(continue with --resume and a smaller learning rate)")

    if not math.isfinite(loss):
        stop(f"the loss ({loss})")
    for g in groups:
        for name, p in g.params.items():
            t = p.grad if what == "gradient" else p
            if t is not None and not bool(torch.isfinite(t).all()):
                stop(f"the {what} of {name}")


def _loss_and_gradients(run: Run, phase: Phase, gen: torch.Generator, it: int, params: list[torch.Tensor]) -> float:
    """The loss of iteration ``it`` on the whole batch, and its gradients in ``.grad``: the one
    place where gradients are combined. Each micro-batch pass redraws the batch from the
    same generator state and takes its piece (:meth:`Run.shard`); the pieces' losses and
    gradients are summed, weighted by their share of the rows, in float64 (exact for two
    halves), then over the ranks."""
    single = run.micro_batches == 1 and not active()  # the gradients are complete as they are
    start = gen.get_state() if run.micro_batches > 1 else None
    total = None
    for part in range(run.micro_batches):
        if part:
            gen.set_state(start)
        run.part, run.share = part, 1.0
        with torch.enable_grad():
            out = phase.loss(gen, it)
            if torch.is_tensor(out):
                out.backward()
                out = out.item()
        if single:
            return out
        flat = torch.cat([torch.tensor([out], dtype=torch.float64, device=params[0].device)]
                         + [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double()
                            for p in params]).mul_(run.share)
        total = flat if total is None else total.add_(flat)
        for p in params:
            p.grad = None
    sum_over_ranks(total)
    offset = 1
    for p in params:
        p.grad = total[offset:offset + p.numel()].view_as(p).to(p)
        offset += p.numel()
    return float(total[0])


def _run_phase(run: Run, phase: Phase, gen: torch.Generator, at: _Position, resumed: dict | None, bar,
               label: str = "") -> None:
    groups = phase.groups(resumed is not None)
    params = [p for g in groups for p in g.params.values()]
    if not params or phase.iters <= 0:
        bar.update(max(0, phase.iters - at.iteration))
        if phase.end is not None:
            phase.end()
        return
    for p in params:
        p.requires_grad_(True)
    opt = Adam(groups)
    named = {k: p for g in groups for k, p in g.params.items()}
    first_avg = phase.averaged_from()
    # the running mean of the iterates from ``first_avg`` on, kept in checkpoints
    avg = {k: torch.zeros_like(p) for k, p in named.items()} if first_avg < phase.iters else {}
    scored = phase.score is not None and phase.score_every > 0
    best: dict[str, torch.Tensor] = {}
    best_at = [math.inf, -1]  # the best score and its iterate
    if resumed is not None:
        opt.load(resumed)
        for k in avg:
            if f"engine.avg.{k}" in resumed:
                avg[k] = resumed[f"engine.avg.{k}"].to(avg[k]).clone()
        if scored and "engine.best_at" in resumed:
            best_at = resumed["engine.best_at"].tolist()
            best = {k: resumed[f"engine.best.{k}"].to(p).clone() for k, p in named.items()}

    def score(done: int) -> None:
        with torch.no_grad():
            s = float(phase.score())
            run.log.setdefault("scores", []).append([done, s])
            if s < best_at[0]:
                best_at[:] = [s, done]
                best.update({k: p.detach().clone() for k, p in named.items()})

    if scored and not best:
        score(at.iteration)
    counts = run.denoiser.evaluations
    losses = []
    try:
        for it in range(at.iteration, phase.iters):
            before = dict(counts)
            out = _loss_and_gradients(run, phase, gen, it, params)
            where = f"{label or 'calibration'}, phase {phase.name}, iteration {it}"
            _check_finite(where, out, groups, "gradient")
            opt.step(phase.rate(it))
            opt.zero_grad()
            _check_finite(where, out, groups, "value")
            if it >= first_avg:
                with torch.no_grad():
                    for k, a in avg.items():
                        a.lerp_(named[k], 1.0 / (it - first_avg + 1))
            if counts != before:
                ev = run.log.setdefault("evaluations", {"forward": 0, "backward": 0})
                for k in ev:
                    ev[k] += counts[k] - before[k]
            if phase.curve:
                losses.append(out)
                if len(losses) == 10:
                    run.log.setdefault("loss_curve", []).append(sum(losses) / 10)
                    losses = []
            bar.set_postfix_str(f"{phase.name} {it}: loss {out:.4g}", refresh=False)
            bar.update(1)
            done = it + 1
            if scored and (done % phase.score_every == 0 or done == phase.iters):
                score(done)
            if phase.save_every and done % phase.save_every == 0 and done < phase.iters:
                _save(run, _Position(at.unit, at.phase, done),
                      {**opt.state_tensors(), "engine.generator": gen.get_state(),
                       **{f"engine.avg.{k}": a for k, a in avg.items()},
                       **({"engine.best_at": torch.tensor(best_at, dtype=torch.float64),
                           **{f"engine.best.{k}": b for k, b in best.items()}} if scored else {})})
        with torch.no_grad():
            for k, a in avg.items():
                named[k].copy_(a)
            for k, b in best.items():
                named[k].copy_(b)
        if scored:
            run.log["chosen_iterate"] = int(best_at[1])
    finally:
        for p in params:
            p.requires_grad_(False)
    if phase.end is not None:
        phase.end()


# ---------------------------------------------------------------------------- cached results of methods
def result_key(base_key: str, config: MethodConfig) -> str:
    """The key of the result of ``config`` under a run's ``base_key`` (other options than the
    defaults are part of it)."""
    extra = {} if config.is_default() else {"options": config.to_dict()}
    return digest({"base": base_key, "method": config.NAME, "version": config.VERSION, **extra})


def _result_path(run: Run, config: MethodConfig) -> tuple[str, Path | None]:
    key = result_key(run.base_key, config)
    return key, (run.result_cache / f"{key}.safetensors" if run.result_cache is not None and run.base_key else None)


def save_result(run: Run, config: MethodConfig, log: dict) -> None:
    """Keep the quantizers as the result of ``config`` for :func:`start_from`.
    An entry that exists stays: runs that share a starting point must share exactly the
    same one (another thread count can flip a learned rounding)."""
    key, path = _result_path(run, config)
    if path is not None and not path.exists() and is_main():
        save_checkpoint(path, run.model, key, 1, extra=log)


def cached_result(run: Run, config: MethodConfig) -> dict | None:
    """Set the quantizers to ``config``'s cached result for this model, config, data and
    seed and return its log, or return ``None`` when there is none."""
    key, path = _result_path(run, config)
    state = read_checkpoint(path, key) if path is not None else None
    if state is None:
        return None
    load_quantizers(run.model, state[1])
    return {**state[2], "cached": True}


def cached_or_calibrate(run: Run, config: MethodConfig, reuse: bool = True) -> dict:
    """Set the quantizers to ``config``'s result: from the result cache when ``reuse`` and
    this model, config, data and seed have it there, else by :func:`calibrate` on ``run``
    (resumable from its checkpoint), then kept in the cache. Returns the result's log."""
    log = cached_result(run, config) if reuse else None
    if log is None:
        t0 = time.perf_counter()
        calibrate(run, config)
        log = {"method": config.NAME, "seconds": round(time.perf_counter() - t0, 2), **run.log}
        save_result(run, config, log)
    return log


def start_from(run: Run, name: str, options: dict | None = None) -> None:
    """Set the quantizers to method ``name``'s result with ``options`` (default: its
    defaults), cached or computed (:func:`cached_or_calibrate`, resumable from its own
    checkpoint beside this run's); its log becomes ``run.log["init"]``."""
    ckpt = None if run.checkpoint is None else run.checkpoint.with_name(run.checkpoint.stem + ".init.safetensors")
    run.log["init"] = cached_or_calibrate(dataclasses.replace(run, checkpoint=ckpt, log={}),
                                          options_of(name, options or {}))
    if ckpt is not None and is_main():
        ckpt.unlink(missing_ok=True)
