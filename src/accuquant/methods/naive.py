"""Naive PTQ: ranges from data, nothing learned.

Weights: per-channel ranges searched for the lowest quantization error (the config's
``weight_init``, MSE by default). Activations: per-tensor ranges from the inputs every
quantizer sees while the model denoises the calibration trajectories, over all steps
(``act_init``: min-max, percentile, or MSE on a bounded random sample of the values).
These ranges are also the starting point of every other method.
"""

from __future__ import annotations

import torch

from ..layers import all_quantizers, quant_layers
from ..progress import progress_bar
from ..quantizers import RangeObserver
from . import CalibrationContext, method_options, register_method


@torch.no_grad()
def init_weight_ranges(ctx: CalibrationContext) -> None:
    """Search the range of every weight quantizer on its weight."""
    for layer in quant_layers(ctx.denoiser.model).values():
        for q, part in layer.weight_parts():
            q.init_range(part, ctx.config.weight_init, ctx.config.percentile)


def _act_quantizers(model) -> dict:
    weight_ids = {id(q) for layer in quant_layers(model).values() for q in layer.weight_quant}
    return {n: q for n, q in all_quantizers(model).items() if id(q) not in weight_ids}


def _per_step(ctx: CalibrationContext, max_pairs: int | None) -> int:
    n, s = ctx.calib.num_samples, ctx.calib.num_steps
    return n if max_pairs is None else max(1, min(n, max_pairs // s))


def num_calibration_batches(ctx: CalibrationContext, max_pairs: int | None = None) -> int:
    return ctx.calib.num_steps * -(-_per_step(ctx, max_pairs) // ctx.batch_size)


def calibration_batches(ctx: CalibrationContext, max_pairs: int | None = None, seed: int = 0):
    """Yield ``(x_t, t, cond)`` batches of FP trajectory points over all steps.

    Points are grouped by step (one timestep per batch); with ``max_pairs`` a seeded
    random subset of the (sample, step) pairs is used, spread evenly over steps.
    """
    calib = ctx.calib
    n, s = calib.num_samples, calib.num_steps
    g = torch.Generator().manual_seed(seed)
    per_step = _per_step(ctx, max_pairs)
    for i in range(s):
        idx = torch.randperm(n, generator=g)[:per_step].sort().values
        for start in range(0, len(idx), ctx.batch_size):
            b = idx[start : start + ctx.batch_size]
            cond = calib.cond.index(b).to(ctx.device) if len(calib.cond) else calib.cond
            yield calib.xs[b, i].to(ctx.device), calib.timesteps[i], cond


@torch.no_grad()
def init_act_ranges(ctx: CalibrationContext) -> None:
    """Observe every activation quantizer's input on the calibration trajectories and set its range."""
    quants = _act_quantizers(ctx.denoiser.model)
    if not quants:
        return
    max_pairs = ctx.options.get("act_calib_pairs")
    observers = {}
    for k, (name, q) in enumerate(quants.items()):
        q.observer = observers[name] = RangeObserver(seed=ctx.seed + k)
    try:
        total = num_calibration_batches(ctx, max_pairs)
        with progress_bar(total, "activation ranges", disable=not ctx.progress) as bar:
            for x, t, cond in calibration_batches(ctx, max_pairs, ctx.seed):
                ctx.denoiser(x, t, cond)
                bar.update(1)
    finally:
        for q in quants.values():
            q.observer = None
    for name, q in quants.items():
        observers[name].apply(q, ctx.config.act_init, ctx.config.percentile)


@register_method("naive", {"act_calib_pairs": None})
def naive(ctx: CalibrationContext) -> None:
    """Naive PTQ: MSE-searched per-channel weight ranges, activation ranges from calibration data."""
    method_options(ctx, {"act_calib_pairs": None}, "naive")
    init_weight_ranges(ctx)
    init_act_ranges(ctx)
