"""Mixed precision by accumulated error: which layers get 8, 6 or the low weight width.

Sensitivity (the direct measure): for each layer the config quantizes, its weight alone is
quantized at a candidate width (per channel or group, ranges searched as the config says;
every other layer and every activation in full precision), and the model runs the FP
trajectories ``M`` steps at a time from their stored states (every group of ``M``
consecutive steps, a fixed batch of trajectories); the sensitivity is the mean squared
distance to the FP trajectory ``M`` steps later, AccuQuant's multistep loss. It measures
what one layer's rounding does to the error that accumulates over sampling, where
published metrics (MixDQ's output SQNR, TMPDiff's per-timestep error) score one step.

Allocation: the widths that minimise the summed sensitivities with the parameters' average
width at most the budget, exactly, by dynamic programming over the extra bits above the
lowest width in units of 1/``UNITS`` of the whole model's extra-bit budget span (each
layer's cost rounded up, so the budget is never exceeded).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..config import QuantConfig
from ..progress import progress_bar
from ..quant.layers import WRAPPABLE, QuantLayer, kept_fp
from .multistep import multistep_loss

#: the widths a layer can get, beside the config's lowest
WIDTHS = (6, 8)
#: resolution of the allocation's budget
UNITS = 4000


def candidate_layers(model: torch.nn.Module, config: QuantConfig) -> dict[str, torch.nn.Module]:
    """The layers :func:`~accuquant.quant.layers.wrap_model` quantizes, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, WRAPPABLE) and not kept_fp(n, config)}


@torch.no_grad()
def _quantized_weight(module, config: QuantConfig, bits: int, split: int | None) -> torch.Tensor:
    cfg = dataclasses.replace(config, weight_bits=bits, act_bits=None, outliers=(), layer_bits=None,
                              mixed_precision=None)
    layer = QuantLayer(module, cfg, split)
    for q, part in layer.weight_parts():
        q.init_range(part, config.weight_init, config.percentile)
    return layer.weight.detach().clone()


@torch.no_grad()
def sensitivities(den, solver, calib, config: QuantConfig, splits: dict[str, int], *, group: int = 4,
                  trajectories: int = 8, device="cpu", progress: bool = True) -> dict[str, dict[int, float]]:
    """Each layer's multistep loss with its weight alone at each width (see the module docstring)."""
    layers = candidate_layers(den.model, config)
    widths = sorted({config.weight_bits, *(w for w in WIDTHS if w > config.weight_bits)})
    idx = torch.arange(min(trajectories, calib.num_samples))
    xs, outs, cond = calib.xs[idx].to(device), calib.outs[idx].to(device), calib.cond.index(idx).to(device)
    starts = list(range(0, calib.num_steps, group))

    def loss() -> float:
        total = 0.0
        for s in starts:
            m = min(group, calib.num_steps - s)
            state = solver.state_at(s, xs, outs)
            total += multistep_loss(den, solver, xs[:, s], state, s, m, cond, xs[:, s + m]).item()
        return total / len(starts)

    out: dict[str, dict[int, float]] = {}
    with progress_bar(len(layers) * len(widths), "mixed precision: sensitivities", disable=not progress) as bar:
        for name, module in layers.items():
            fp = module.weight.data.clone()
            out[name] = {}
            for b in widths:
                module.weight.data.copy_(_quantized_weight(module, config, b, splits.get(name)))
                try:
                    out[name][b] = loss()
                finally:
                    module.weight.data.copy_(fp)
                bar.update(1)
    return out


def allocate(sens: dict[str, dict[int, float]], params: dict[str, int], average: float) -> dict[str, int]:
    """Widths minimising the summed sensitivities with ``sum(params * bits) <= average * sum(params)``
    (exact up to the cost rounding described in the module docstring)."""
    low = min(min(s) for s in sens.values())
    total = sum(params.values())
    span = (max(max(s) for s in sens.values()) - low) * total
    if span == 0 or average <= low:
        return {n: low for n in sens}
    if all(average >= max(s) for s in sens.values()):
        return {n: min(s, key=s.get) for n, s in sens.items()}  # every width affordable: each its best
    unit = span / UNITS
    budget = int(math.floor((average - low) * total / unit + 1e-9))
    names = list(sens)
    # best[c]: the lowest summed sensitivity with extra cost c; choice[i][c]: layer i's width there
    inf = float("inf")
    best = [0.0] + [inf] * budget
    choices = []
    for n in names:
        new = [inf] * (budget + 1)
        pick = [low] * (budget + 1)
        for b, value in sens[n].items():
            cost = math.ceil((b - low) * params[n] / unit - 1e-9)
            for c in range(cost, budget + 1):
                v = best[c - cost] + value
                if v < new[c]:
                    new[c], pick[c] = v, b
        best = new
        choices.append(pick)
    c = min(range(budget + 1), key=lambda k: best[k])
    out = {}
    for n, pick in zip(reversed(names), reversed(choices)):
        b = pick[c]
        out[n] = b
        c -= math.ceil((b - low) * params[n] / unit - 1e-9)
    return {n: out[n] for n in names}


def mixed_config(den, solver, calib, config: QuantConfig, splits: dict[str, int], device="cpu",
                 progress: bool = True) -> tuple[QuantConfig, dict]:
    """``config`` with the per-layer widths of its ``mixed_precision`` budget written in
    ``layer_bits``, and what was measured (for the quantization record)."""
    sens = sensitivities(den, solver, calib, config, splits, device=device, progress=progress)
    layers = candidate_layers(den.model, config)
    params = {n: layers[n].weight.numel() for n in sens}
    bits = allocate(sens, params, config.mixed_precision)
    total = sum(params.values())
    achieved = sum(params[n] * b for n, b in bits.items()) / total
    layer_bits = {n: [b, config.act_bits] for n, b in bits.items() if b != config.weight_bits}
    info = {"budget": config.mixed_precision, "average_weight_bits": round(achieved, 4),
            "layers_by_width": {str(b): sum(1 for v in bits.values() if v == b) for b in sorted(set(bits.values()))},
            "sensitivity": {n: {str(b): v for b, v in s.items()} for n, s in sens.items()}}
    return dataclasses.replace(config, layer_bits=layer_bits or None), info
