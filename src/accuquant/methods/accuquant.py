"""AccuQuant: calibrate by simulating groups of consecutive denoising steps.

Notation of METHOD.md: the sampling trajectory (the inference solver and its steps) is
cut into consecutive groups of ``M = group_size`` steps. An iteration draws a group
starting at step ``t`` (``schedule``: at random or in turn) and a batch of stored FP
trajectories, runs the group's ``M`` steps with the quantized model from the FP sample
``x_t`` (guided steps: both branches) and minimises

    L = mean((x~_{t-M} - x_{t-M})^2)

against the stored FP sample ``M`` steps later; the FP model is never re-run. The
gradient of ``L`` (``grad``: ``exact``, ``checkpoint`` or the paper's ``approx``) is
computed by :mod:`accuquant.multistep` with one step's activations alive at a time.

What is learned: the step size of every quantizer of the denoiser jointly (per output
channel for weights, per tensor for activations; LSQ gradients, Adam at a rate relative
to each step size), starting from the ``init`` method's result. With ``rounding="keep"``
a learned rounding (per-step's) stays as the integer codes it chose and the weight step
sizes scale them; with ``"learn"`` the AdaRound variables are learned jointly, softened
around the initial decisions, with AdaRound's annealed regulariser, and hardened at the end.

``sample_weights="gradient-aligned"`` weighs each group's loss by how well its gradient
agrees with the mean over the groups (:func:`alignment_weights`; our reading of
gradient-aligned calibration, docs/methods.md).

"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..cache import derive_seed
from ..calibrate.protocol import Group, Method, Phase, Run, Unit
from ..quant.layers import all_quantizers, outlier_parameters, quant_layers
from ..calibrate.multistep import GRAD_MODES, multistep_backward
from ..quant.quantizers import annealed_beta
from ..quant.rounding import fix_learned_codes, harden, learnable_rounding, penalty
from ..config import MethodConfig, option
from .registry import register_method, start_from


@dataclass
class AccuQuantConfig(MethodConfig):
    NAME = "accuquant"
    #: 2: learned rounding kept as fixed codes; 3: the engine's Adam and one random stream per run; 4: with
    #: outlier transforms, these stay as the initialisation left them unless learn_outliers says otherwise
    VERSION = 4
    #: options that measured no gain and were removed (their defaults gave this version's results)
    RETIRED = ("lr_decay", "average", "select_every", "holdout")
    group_size: int = option(4, "denoising steps simulated per group, M", minimum=1)
    grad: str = option("checkpoint", "gradient through a group", choices=GRAD_MODES)
    init: str = option("per-step", "starting point", choices=("per-step", "naive"))
    init_iters: int = option(300, "AdaRound iterations per block of the per-step start", minimum=0)
    init_act_iters: int = option(100, "activation step-size iterations per block of the per-step start", minimum=0)
    init_samples: int = option(32, "calibration points per sampling step of the per-step start", minimum=1)
    iters: int = option(100, "optimisation steps", minimum=0)
    lr: float = option(1e-3, "learning rate relative to each step size", positive=True, rate=True)
    traj_batch: int = option(8, "trajectories per optimisation step", flag="batch-size", minimum=1)
    schedule: str = option("uniform", "order of groups (uniform: at random)", choices=("uniform", "cycle"))
    rounding: str = option("keep", "weight rounding: keep (the initialisation's integer codes, scaled by the "
                           "learned step sizes) or learn (AdaRound variables learned jointly)",
                           choices=("keep", "learn"))
    save_every: int = option(25, "checkpoint period in iterations", cli=False, minimum=1)
    outlier_lr: float = option(1e-4, "learning rate of the outlier transforms (smoothing scales' logs, low-rank "
                               "factors), with outliers", positive=True, rate=True)
    learn_outliers: str = option("none", "which outlier parameters learn, with outliers: none (the step sizes "
                                 "alone, as without), branch (also the low-rank factors, a floating-point "
                                 "correction beside the quantized weight), all (also the smoothing scales; with the "
                                 "codes kept these rescale the inputs alone, no longer an exact rewrite)",
                                 choices=("none", "branch", "all"))
    round_lr: float = option(5e-2, "learning rate of the rounding variables (rounding=learn)", cli=False,
                             positive=True, rate=True)
    round_reg: float = option(1e-4, "weight of the rounding regulariser, relative to the loss", cli=False, minimum=0)
    round_margin: float = option(2.0, "|alpha| of a hard decision made learnable again", cli=False, positive=True)
    sample_weights: str = option("uniform", "weights of the groups in the loss: uniform, or gradient-aligned "
                                 "(each group's gradient on a fixed batch against their mean gradient, refreshed "
                                 "every save_every iterations: a group pulling the other way counts less)",
                                 choices=("uniform", "gradient-aligned"))
    LATER = {"sample_weights": "uniform"}


def groups(num_steps: int, m: int) -> list[tuple[int, int]]:
    """Consecutive, non-overlapping groups ``(start, length)`` covering every step."""
    return [(s, min(m, num_steps - s)) for s in range(0, num_steps, m)]


def alignment_weights(grads: torch.Tensor) -> torch.Tensor:
    """Weights of groups from their gradients (one row each): ``relu(cos(g_k, mean g))``,
    scaled to a mean of 1 (all 1 where none agrees with the mean)."""
    grads = grads.double()
    mean = grads.mean(0)
    w = (grads @ mean / (grads.norm(dim=1) * mean.norm()).clamp_min(1e-300)).clamp_min(0)
    return (w / w.mean() if float(w.sum()) > 0 else torch.ones_like(w)).float()


@register_method
class AccuQuant(Method):
    """AccuQuant (see the module docstring)."""

    Config = AccuQuantConfig

    def initialise(self, run: Run) -> None:
        c = self.config
        start_from(run, c.init, {"iters": c.init_iters, "act_iters": c.init_act_iters,
                                 "samples_per_step": c.init_samples} if c.init == "per-step" else {})

    def units(self, run: Run) -> list[Unit]:
        c = self.config
        run.log["groups"] = grp = groups(run.calib.num_steps, c.group_size)
        layers = quant_layers(run.model)
        learn = c.rounding == "learn"
        start: dict = {}
        n = run.calib.num_samples
        learned: list[torch.Tensor] = []
        weights: dict = {}  # iteration they were computed at -> weight per group

        def params(resumed: bool) -> list[Group]:
            scales = Group({f"{n}.scale": q.scale for n, q in all_quantizers(run.model).items() if q.enabled}, c.lr,
                           relative=True)
            extra = {k: v for k, v in outlier_parameters(layers).items()
                     if c.learn_outliers == "all" or (c.learn_outliers == "branch" and ".lora_" in k)}
            outliers = [Group(extra, c.outlier_lr)] if extra else []
            if not learn:
                fix_learned_codes(layers)
                out = [scales, *outliers]
            else:
                alphas = learnable_rounding(layers, c.round_margin, resumed)
                start.update({k: a.detach() >= 0 for k, a in alphas.items()})
                out = [scales, Group(alphas, c.round_lr), *outliers]
            learned[:] = [t for g in out for t in g.params.values()]
            return out

        def group_weights(it: int) -> torch.Tensor:
            """The groups' :func:`alignment_weights` from their gradients on a fixed batch, computed at
            multiples of ``save_every``, so that a resumed run computes the same weights."""
            at = it - it % c.save_every
            if at not in weights:
                g = torch.Generator().manual_seed(derive_seed("gradient-aligned", run.seed, at))
                idx = torch.randperm(n, generator=g)[: c.traj_batch]
                xs, outs, cond = run.trajectories(idx)
                grads = []
                for s, length in grp:
                    for p in learned:
                        p.grad = None
                    multistep_backward(run.denoiser, run.solver, xs[:, s], run.solver.state_at(s, xs, outs), s,
                                       length, cond, xs[:, s + length], c.grad)
                    grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                            for p in learned]).double())
                for p in learned:
                    p.grad = None
                weights.clear()
                weights[at] = alignment_weights(torch.stack(grads))
                run.log.setdefault("group_weights", {})[str(at)] = [round(float(v), 4) for v in weights[at]]
            return weights[at]

        def loss(gen: torch.Generator, it: int) -> float:
            k = int(torch.randint(len(grp), (1,), generator=gen)) if c.schedule == "uniform" else it % len(grp)
            s, length = grp[k]
            weight = float(group_weights(it)[k]) if c.sample_weights == "gradient-aligned" else 1.0
            idx = run.shard(torch.randperm(n, generator=gen)[: c.traj_batch])
            xs, outs, cond = run.trajectories(idx)
            value = multistep_backward(run.denoiser, run.solver, xs[:, s], run.solver.state_at(s, xs, outs), s,
                                       length, cond, xs[:, s + length], c.grad, weight)
            warm = int(0.2 * c.iters)
            if learn and it >= warm:  # AdaRound's annealed regulariser, scaled by the loss
                beta = annealed_beta((it - warm) / max(1, c.iters - warm))
                (c.round_reg * value * penalty(all_quantizers(run.model).values(), beta)).backward()
            return value

        def end() -> None:
            if learn:
                run.log["rounding"] = harden(layers, start)

        @contextmanager
        def trajectory(index: int):
            yield [Phase("group", c.iters, params, loss, end, save_every=c.save_every, curve=True)]

        return [Unit("trajectory", c.iters, trajectory)]
