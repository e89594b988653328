"""The calibration engine: the one loop every learning method runs in.

A method supplies its initialisation, its units of work and, per unit, its phases
(:mod:`accuquant.calibrate.protocol`). The engine owns everything else:

* a random generator per unit, seeded by (method, seed, unit index), from which every
  batch of the unit is drawn, so a run's result does not depend on where it resumed;
* one optimiser (:class:`~accuquant.calibrate.optim.Adam`) and the one place where
  gradients are combined before a step (:func:`_loss_and_gradients`): under
  ``torch.distributed`` each rank computes the loss on its rows of the batch
  (:meth:`Run.shard`), in ``micro_batches`` passes if asked (gradient accumulation), and
  the gradients are summed there, weighted by each piece's share of the rows, so every
  rank takes the step one process would;
* checkpoints (written by rank 0 only) after the initialisation, after every unit and
  every ``save_every`` iterations of a phase (quantizers, optimiser and generator state,
  the log), and resume from them;
* the progress bar with the current loss, the log, and the count of denoiser evaluations.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..cache import derive_seed
from ..errors import DivergenceError
from ..io.checkpoint import load_quantizers, read_checkpoint, save_checkpoint
from ..progress import progress_bar
from .distributed import active, is_main, sum_over_ranks
from .optim import Adam
from .protocol import Group, Method, Phase, Run, Unit


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


def calibrate(run: Run, method: Method) -> None:
    """Run ``method`` on ``run``: initialise (or resume from the checkpoint), then every
    unit's phases; the quantizers end calibrated, the log in ``run.log``."""
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
            _run_units(run, method.config.NAME, units, pos, tensors)


def _run_units(run: Run, name: str, units: list[Unit], pos: _Position, tensors: dict) -> None:
    t0 = time.perf_counter()
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
                              "(continue with resume and a smaller learning rate)")

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
    if resumed is not None:
        opt.load(resumed)
    counts, losses = run.denoiser.evaluations, []
    try:
        for it in range(at.iteration, phase.iters):
            before = dict(counts)
            out = _loss_and_gradients(run, phase, gen, it, params)
            where = f"{label or 'calibration'}, phase {phase.name}, iteration {it}"
            _check_finite(where, out, groups, "gradient")
            opt.step()
            opt.zero_grad()
            _check_finite(where, out, groups, "value")
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
            if phase.save_every and done % phase.save_every == 0 and done < phase.iters:
                _save(run, _Position(at.unit, at.phase, done), {**opt.state_tensors(), "engine.generator": gen.get_state()})
    finally:
        for p in params:
            p.requires_grad_(False)
    if phase.end is not None:
        phase.end()
