"""AccuQuant: calibrate by simulating groups of consecutive denoising steps.

The sampling trajectory (the inference solver and steps) is cut into consecutive groups
of ``group_size`` steps. An iteration picks a group (``schedule``: uniformly at random,
or in turn), a batch of stored FP trajectories, runs the group's steps with the quantized
model from the FP samples at its start (guided steps: both branches), and pulls the
result towards the stored FP samples at its end (:mod:`accuquant.multistep`, with the
``grad`` mode chosen). The FP model is never re-run.

What is learned: the step sizes of every quantizer of the denoiser jointly, per output
channel for weights and per tensor for activations (LSQ gradients), starting from the
``init`` method's result (``"per-step"``; ``"naive"``), which is cached and shared with
other runs on the same model, config, data and seed. With ``rounding="keep"`` a learned
rounding (per-step's) is kept as the integer codes it chose, and the weight step sizes
scale those codes: re-deriving the codes as ``floor(w / s) + decision`` at the moving step
size would move every weight that crosses a grid point by a whole step (at W3A8 less than
1% of the codes, which cost more than AccuQuant gained). Round-to-nearest weights
(``init="naive"``) are re-rounded at the current step size, as in LSQ.
Updates are Adam directions scaled by each step size's initial value (``lr`` is a
relative rate), so one rate fits step sizes of any magnitude.

Resumable like ``per-step``: the quantizers and the optimiser state are saved every
``save_every`` iterations; every iteration draws its batch from a generator seeded by
(seed, iteration), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import torch

from ..checkpoint import load_quantizers, read_checkpoint, save_checkpoint
from ..layers import all_quantizers, quant_layers
from ..multistep import GRAD_MODES, multistep_backward
from ..errors import AccuQuantError
from ..progress import progress_bar
from ..quantizers import annealed_beta
from . import (CalibrationContext, get_method, load_cached_result, method_options, register_method, save_result,
               weights_frozen)

DEFAULTS = {
    "group_size": 4,  # M: denoising steps simulated per group
    "grad": "checkpoint",  # exact | checkpoint | approx (checkpoint: lower mean, better worst seed at equal cost)
    "init": "per-step",  # per-step | naive
    "iters": 100,  # optimisation steps
    "lr": 1e-3,  # Adam learning rate, relative to each step size (ablation: best of 3e-4, 1e-3, 3e-3 on 3 of 3 seeds)
    "traj_batch": 8,  # trajectories per optimisation step
    "schedule": "uniform",  # uniform | cycle
    "save_every": 25,  # checkpoint period in iterations
    "rounding": "keep",  # keep (the init's codes, scaled by the learned step sizes) | learn (AdaRound jointly)
    "round_lr": 5e-2,  # Adam learning rate of the rounding variables (rounding="learn"; 100 steps can flip a decision)
    "round_reg": 1e-4,  # weight of the rounding regulariser (a sum over weights), relative to the loss
    "round_margin": 2.0,  # |alpha| given to a hard rounding decision when it is made learnable again
}
ROUNDING = ("keep", "learn")
SCHEDULES = ("uniform", "cycle")


def groups(num_steps: int, m: int) -> list[tuple[int, int]]:
    """Consecutive, non-overlapping groups ``(start, length)`` covering every step."""
    return [(s, min(m, num_steps - s)) for s in range(0, num_steps, m)]


def _iter_seed(seed: int, it: int) -> int:
    h = hashlib.sha256(f"accuquant:{seed}:{it}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class RelativeAdam:
    """Adam whose step for each element is scaled by that element's initial value (step
    sizes, kept positive), or plain Adam with ``relative=False`` (rounding variables)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 relative: bool = True):
        self.params, self.lr, self.betas, self.eps, self.relative = params, lr, betas, eps, relative
        self.ref = {k: p.detach().abs().clone().clamp_min(1e-8) if relative else torch.ones_like(p)
                    for k, p in params.items()}
        self.m = {k: torch.zeros_like(p) for k, p in params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in params.items()}
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for k, p in self.params.items():
            if p.grad is None:
                continue
            self.m[k].mul_(b1).add_(p.grad, alpha=1 - b1)
            self.v[k].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            mhat = self.m[k] / (1 - b1**self.t)
            vhat = self.v[k] / (1 - b2**self.t)
            p.sub_(self.lr * self.ref[k] * mhat / (vhat.sqrt() + self.eps))
            if self.relative:
                p.clamp_(min=1e-8)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def state(self, prefix: str = "adam") -> dict[str, torch.Tensor]:
        out = {f"{prefix}.t": torch.tensor(self.t)}
        for k in self.params:
            out[f"{prefix}.ref.{k}"], out[f"{prefix}.m.{k}"], out[f"{prefix}.v.{k}"] = self.ref[k], self.m[k], self.v[k]
        return out

    def load(self, tensors: dict[str, torch.Tensor], prefix: str = "adam") -> None:
        self.t = int(tensors[f"{prefix}.t"])
        for k in self.params:
            self.ref[k] = tensors[f"{prefix}.ref.{k}"].clone()
            self.m[k] = tensors[f"{prefix}.m.{k}"].clone()
            self.v[k] = tensors[f"{prefix}.v.{k}"].clone()


def fix_learned_codes(model: torch.nn.Module) -> None:
    """Turn every hard learned rounding of the (unfrozen) weights into fixed integer codes."""
    for layer in quant_layers(model).values():
        if layer.frozen:
            continue
        for q, part in layer.weight_parts():
            if q.enabled and q.alpha is not None:
                q.fix_codes(part.detach())


def learnable_rounding(model: torch.nn.Module, margin: float, resume: bool = False) -> dict[str, torch.nn.Parameter]:
    """Make the rounding of every weight quantizer learnable (soft AdaRound) and return the
    rounding variables. A hard decision from the initialisation (per-step) becomes
    ``alpha = +-margin``, a soft value close to it; a quantizer that rounds to nearest
    (naive) starts AdaRound from the weights' fractional parts. ``resume``: the variables
    were restored from a checkpoint and are taken as they are."""
    out = {}
    for name, layer in quant_layers(model).items():
        if layer.frozen:
            continue
        for j, (q, part) in enumerate(layer.weight_parts()):
            if not q.enabled:
                continue
            if q.alpha is None:
                q.enable_learned_rounding(part.detach())
            elif not resume:
                with torch.no_grad():
                    q.alpha = torch.nn.Parameter(torch.where(q.alpha >= 0, margin, -margin).to(q.alpha))
            q.soft_rounding = True
            q.alpha.requires_grad_(True)
            out[f"{name}.weight_quant.{j}.alpha"] = q.alpha
    return out


def harden_rounding(model: torch.nn.Module, start: dict[str, torch.Tensor]) -> dict:
    """Back to hard rounding decisions (``alpha >= 0``), which is what is saved; returns the
    share of decisions that changed since ``start`` (the decisions at the start) and the
    share still undecided (soft value between 0.1 and 0.9) just before hardening."""
    changed = undecided = total = 0
    for name, layer in quant_layers(model).items():
        for j, q in enumerate(layer.weight_quant):
            if q.alpha is None:
                continue
            with torch.no_grad():
                h = q._rounding_offset()
                undecided += int(((h > 0.1) & (h < 0.9)).sum())
                prev = start.get(f"{name}.weight_quant.{j}.alpha")
                if prev is not None:
                    changed += int(((q.alpha >= 0) != prev).sum())
                total += q.alpha.numel()
            q.soft_rounding = False
            q.alpha.requires_grad_(False)
    return {"changed": changed / max(1, total), "undecided_before_hardening": undecided / max(1, total)}


def rounding_penalty(model: torch.nn.Module, beta: float) -> torch.Tensor:
    """AdaRound's regulariser summed over every learnable weight element (on the bundled
    model at W4A8 the loss gradient of one rounding variable is about 2e-8 and this sum's
    about 1 times the loss, hence ``round_reg`` 1e-4: the two pull about equally)."""
    total = torch.zeros(())
    for q in all_quantizers(model).values():
        if q.alpha is not None and q.alpha.requires_grad:
            total = total + q.rounding_regularizer(beta)
    return total


def _initialise(ctx: CalibrationContext, init: str) -> None:
    """Run the ``init`` method with its default options, or take its cached result (the
    same model, config, data and seed give the same starting point, so runs that differ
    only in AccuQuant's own options, and the ``init`` method run on its own, share it)."""
    if init not in ("naive", "per-step"):
        raise AccuQuantError(f"init: {init!r} is not one of naive, per-step")
    log = load_cached_result(ctx, init)
    if log is not None:
        ctx.log["init"] = {**log, "cached": True}
        return
    sub_ckpt = None if ctx.checkpoint is None else ctx.checkpoint.with_name(ctx.checkpoint.stem + ".init.safetensors")
    sub = dataclasses.replace(ctx, options={}, checkpoint=sub_ckpt, log={})
    t0 = time.perf_counter()
    get_method(init)(sub)
    ctx.log["init"] = {"method": init, "seconds": round(time.perf_counter() - t0, 2), **sub.log}
    if sub_ckpt is not None:
        sub_ckpt.unlink(missing_ok=True)
    save_result(ctx, init, ctx.log["init"])


@register_method("accuquant", DEFAULTS, version=2)  # 2: learned rounding kept as fixed codes
def accuquant(ctx: CalibrationContext) -> None:
    """AccuQuant (see the module docstring)."""
    opts = method_options(ctx, DEFAULTS, "accuquant")
    if opts["grad"] not in GRAD_MODES:
        raise AccuQuantError(f"grad: {opts['grad']!r} is not one of {', '.join(GRAD_MODES)}")
    if opts["rounding"] not in ROUNDING:
        raise AccuQuantError(f"rounding: {opts['rounding']!r} is not one of {', '.join(ROUNDING)}")
    if opts["schedule"] not in SCHEDULES:
        raise AccuQuantError(f"schedule: {opts['schedule']!r} is not one of {', '.join(SCHEDULES)}")
    with weights_frozen(ctx.denoiser.model):
        _run(ctx, opts)


def _run(ctx: CalibrationContext, opts: dict) -> None:
    model, den, solver, calib = ctx.denoiser.model, ctx.denoiser, ctx.solver, ctx.calib
    key = ctx.run_key
    state = read_checkpoint(ctx.checkpoint, key) if (ctx.resume and ctx.checkpoint) else None
    if state is None:
        _initialise(ctx, opts["init"])
    params = {f"{n}.scale": q.scale for n, q in all_quantizers(model).items() if q.enabled}
    for p in params.values():
        p.requires_grad_(True)
    opt = RelativeAdam(params, opts["lr"])
    start_it, tensors = 0, None
    if state is not None:
        start_it, tensors, extra = state
        load_quantizers(model, tensors)
        opt.load(tensors)
        ctx.log.update(extra.get("log", {}))
        ctx.log["resumed_at_iteration"] = start_it
    learn_round = opts["rounding"] == "learn"
    if not learn_round:
        fix_learned_codes(model)
    alphas = learnable_rounding(model, float(opts["round_margin"]), resume=state is not None) if learn_round else {}
    ropt = RelativeAdam(alphas, float(opts["round_lr"]), relative=False)
    decisions = {k: a.detach() >= 0 for k, a in alphas.items()}  # (after a resume: those at the checkpoint)
    if tensors is not None and alphas:
        ropt.load(tensors, "round_adam")

    def opt_state() -> dict[str, torch.Tensor]:
        return {**opt.state(), **(ropt.state("round_adam") if alphas else {})}

    if state is None and ctx.checkpoint is not None:
        save_checkpoint(ctx.checkpoint, model, key, 0, extra={"log": ctx.log}, tensors=opt_state())
    m, iters, nb = int(opts["group_size"]), int(opts["iters"]), int(opts["traj_batch"])
    if m < 1:
        raise AccuQuantError("group_size must be at least 1")
    grp = groups(calib.num_steps, m)
    rows = 2 if den.guided else 1
    evals = ctx.log.setdefault("evaluations", {"forward": 0, "backward": 0})
    curve = ctx.log.setdefault("loss_curve", [])
    extra_fwd = 0 if opts["grad"] == "exact" else 1
    warm = int(0.2 * iters)  # rounding="learn": iterations before the regulariser starts
    t0 = time.perf_counter()
    losses = []
    with progress_bar(iters, f"accuquant M={m} {opts['grad']}", disable=not ctx.progress) as bar:
        bar.update(start_it)
        for it in range(start_it, iters):
            g = torch.Generator().manual_seed(_iter_seed(ctx.seed, it))
            gi = int(torch.randint(len(grp), (1,), generator=g)) if opts["schedule"] == "uniform" else it % len(grp)
            s, length = grp[gi]
            idx = torch.randperm(calib.num_samples, generator=g)[: min(nb, calib.num_samples)]
            xs, outs = calib.xs[idx], calib.outs[idx]
            x = xs[:, s].to(ctx.device)
            st = solver.state_at(s, xs.to(ctx.device), outs.to(ctx.device))
            cond = calib.cond.index(idx).to(ctx.device) if len(calib.cond) else calib.cond
            target = xs[:, s + length].to(ctx.device)
            with torch.enable_grad():
                loss = multistep_backward(den, solver, x, st, s, length, cond, target, opts["grad"])
                if alphas and it >= warm:
                    # AdaRound's annealed regulariser (exponent from 20 down to 2), scaled by the loss
                    frac = (it - warm) / max(1, iters - warm)
                    beta = annealed_beta(frac)
                    (float(opts["round_reg"]) * loss * rounding_penalty(model, beta)).backward()
            opt.step()
            opt.zero_grad()
            if alphas:
                ropt.step()
                ropt.zero_grad()
            n = len(idx) * rows * length
            evals["forward"] += n * (1 + extra_fwd)
            evals["backward"] += n
            losses.append(loss)
            if len(losses) == 10:
                curve.append(sum(losses) / len(losses))
                losses = []
            bar.set_postfix_str(f"group {s}-{s + length}: loss {loss:.4g}")
            bar.update(1)
            if ctx.checkpoint is not None and ((it + 1) % int(opts["save_every"]) == 0) and it + 1 < iters:
                save_checkpoint(ctx.checkpoint, model, key, it + 1, extra={"log": ctx.log}, tensors=opt_state())
    for p in params.values():
        p.requires_grad_(False)
    if alphas:
        ctx.log["rounding"] = harden_rounding(model, decisions)
    ctx.log["seconds"] = round(time.perf_counter() - t0, 2)
    ctx.log["groups"] = grp
