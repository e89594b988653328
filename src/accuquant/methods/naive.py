"""Naive PTQ: ranges from data, nothing learned.

Weights: per-channel ranges searched for the lowest quantization error (the config's
``weight_init``, MSE by default). Activations: per-tensor ranges from the inputs every
quantizer sees while the model denoises the calibration trajectories, over all steps
(``act_init``: min-max, percentile, or MSE on a bounded random sample of the values).
With outlier handling (``QuantConfig.outliers``), first the closed-form start of each
layer's transforms: SmoothQuant's scales from the per-channel maxima of its inputs on the
same trajectories (in full precision), the low-rank branch from the SVD of the smoothed,
rotated weight. These ranges are also the starting point of the other methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibrate.block_data import quantization_disabled
from ..calibrate.protocol import Method, Run
from ..quant.layers import all_quantizers, quant_layers
from ..progress import progress_bar
from ..quant.quantizers import RangeObserver
from ..config import MethodConfig, option
from .registry import register_method


@dataclass
class NaiveConfig(MethodConfig):
    NAME = "naive"
    act_calib_pairs: int | None = option(None, "trajectory points observed for the activation ranges "
                                         "(default: all)", cli=False, minimum=1)


@torch.no_grad()
def init_weight_ranges(run: Run) -> None:
    """Search the range of every weight quantizer on its weight."""
    for layer in quant_layers(run.model).values():
        for q, part in layer.weight_parts():
            q.init_range(part, run.config.weight_init, run.config.percentile)


@torch.no_grad()
def init_outliers(run: Run, max_pairs: int | None = None) -> None:
    """The closed-form start of every layer's outlier transforms (see the module docstring)."""
    layers = {n: lyr for n, lyr in quant_layers(run.model).items() if lyr.outliers is not None}
    if not layers:
        return
    absmax: dict[str, torch.Tensor] = {}
    smoothed = {n: lyr for n, lyr in layers.items() if lyr.outliers.log_smooth is not None}

    def hook(name: str, dim: int):
        def observe(module, args):
            x = args[0].detach()
            m = x.abs().movedim(dim, -1).reshape(-1, x.shape[dim]).amax(0).float()
            absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)
        return observe

    if smoothed:
        hooks = [lyr.register_forward_pre_hook(hook(n, lyr.outliers.channel_dim)) for n, lyr in smoothed.items()]
        batches = run.calib.num_steps * -(-_points_per_step(run, max_pairs) // run.batch_size)
        try:
            with quantization_disabled(run.model), progress_bar(batches, "smoothing scales",
                                                                 disable=not run.progress) as bar:
                for x, t, cond in calibration_batches(run, max_pairs, run.seed):
                    run.denoiser(x, t, cond)
                    bar.update(1)
        finally:
            for h in hooks:
                h.remove()
    for name, lyr in layers.items():
        lyr.outliers.initialise(lyr.base_weight(), absmax.get(name), run.config.smooth_alpha)


def _act_quantizers(model) -> dict:
    weight_ids = {id(q) for layer in quant_layers(model).values() for q in layer.weight_quant}
    return {n: q for n, q in all_quantizers(model).items() if id(q) not in weight_ids}


def _points_per_step(run: Run, max_pairs: int | None) -> int:
    n, s = run.calib.num_samples, run.calib.num_steps
    return n if max_pairs is None else max(1, min(n, max_pairs // s))


def calibration_batches(run: Run, max_pairs: int | None = None, seed: int = 0):
    """Yield ``(x_t, t, cond)`` batches of FP trajectory points, one step at a time; with
    ``max_pairs`` a seeded random subset of the (sample, step) pairs, spread evenly over steps."""
    calib = run.calib
    n, s = calib.num_samples, calib.num_steps
    g = torch.Generator().manual_seed(seed)
    per_step = _points_per_step(run, max_pairs)
    for i in range(s):
        idx = torch.randperm(n, generator=g)[:per_step].sort().values
        for start in range(0, len(idx), run.batch_size):
            b = idx[start : start + run.batch_size]
            yield calib.xs[b, i].to(run.device), calib.timesteps[i], calib.cond.index(b).to(run.device)


@torch.no_grad()
def init_act_ranges(run: Run, max_pairs: int | None = None) -> None:
    """Observe every activation quantizer's input on the calibration trajectories and set its range."""
    quants = _act_quantizers(run.model)
    if not quants:
        return
    observers = {}
    for k, (name, q) in enumerate(quants.items()):
        q.observer = observers[name] = RangeObserver(seed=run.seed + k)
    batches = run.calib.num_steps * -(-_points_per_step(run, max_pairs) // run.batch_size)
    try:
        with progress_bar(batches, "activation ranges", disable=not run.progress) as bar:
            for x, t, cond in calibration_batches(run, max_pairs, run.seed):
                run.denoiser(x, t, cond)
                bar.update(1)
    finally:
        for q in quants.values():
            q.observer = None
    for name, q in quants.items():
        observers[name].apply(q, run.config.act_init, run.config.percentile)


@register_method
class Naive(Method):
    """Naive PTQ: MSE-searched per-channel weight ranges, activation ranges from calibration data."""

    Config = NaiveConfig

    def initialise(self, run: Run) -> None:
        init_outliers(run, self.config.act_calib_pairs)
        init_weight_ranges(run)
        init_act_ranges(run, self.config.act_calib_pairs)
