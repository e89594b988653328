"""Mixed precision by accumulated error: which layers get 8, 6 or the low width, for weights
(``mixed_precision``) and for layer inputs (``act_mixed_precision``).

Sensitivity (the direct measure): for each layer the config quantizes, its weight alone is
quantized at a candidate width (per channel or group, ranges searched as the config says;
every other layer and every activation in full precision), or its input alone (dynamically:
each token's range with ``act_granularity="token"``, else each sample's min-max range; one
range for both parts of a split shortcut), and the model runs the FP
trajectories ``M`` steps at a time from their stored states (every group of ``M``
consecutive steps, a fixed batch of trajectories); the sensitivity is the mean squared
distance to the FP trajectory ``M`` steps later, AccuQuant's multistep loss. It measures
what one layer's rounding does to the error that accumulates over sampling, where
published metrics (MixDQ's output SQNR, TMPDiff's per-timestep error) score one step.

Allocation: the widths that minimise the summed sensitivities with the average width at
most the budget (weights: averaged over parameters; inputs: over the elements of one
sample's layer inputs), each of the two on its own, exactly, by dynamic programming over the extra bits above the
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
from ..quant.quantizers import int_range, token_quant
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


def _quantized_input(bits: int, config: QuantConfig, conv: bool, split: int | None = None):
    """A forward pre-hook quantizing a layer's input dynamically at ``bits`` (see the module
    docstring); a split layer's two parts each on their own grid, as the quantized layer has them."""
    qmin, qmax = int_range(bits, config.act_symmetric)
    one, dim = torch.ones(()), 1 if conv else -1

    def quant(x):
        if config.act_granularity == "token":
            return token_quant(x, one, qmin, qmax, config.act_symmetric, dim)
        return token_quant(x.reshape(x.shape[0], -1), one, qmin, qmax, config.act_symmetric, -1).reshape(x.shape)

    def hook(module, args):
        x = args[0]
        parts = [x] if split is None else [x.narrow(dim, 0, split), x.narrow(dim, split, x.shape[dim] - split)]
        return (torch.cat([quant(p) for p in parts], dim=dim), *args[1:])

    return hook


@torch.no_grad()
def sensitivities(den, solver, calib, config: QuantConfig, splits: dict[str, int], *, kind: str = "weight",
                  group: int = 4, trajectories: int = 8, device="cpu",
                  progress: bool = True) -> dict[str, dict[int, float]]:
    """Each layer's multistep loss with its weight (``kind="weight"``) or its input
    (``kind="act"``) alone at each width (see the module docstring)."""
    layers = candidate_layers(den.model, config)
    low = config.weight_bits if kind == "weight" else config.act_bits
    widths = sorted({low, *(w for w in WIDTHS if w > low)})
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
    with progress_bar(len(layers) * len(widths), f"mixed precision: {kind} sensitivities",
                      disable=not progress) as bar:
        for name, module in layers.items():
            out[name] = {}
            for b in widths:
                if kind == "weight":
                    fp = module.weight.data.clone()
                    module.weight.data.copy_(_quantized_weight(module, config, b, splits.get(name)))
                    undo = lambda: module.weight.data.copy_(fp)  # noqa: E731
                else:
                    conv = isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d))
                    undo = module.register_forward_pre_hook(_quantized_input(b, config, conv, splits.get(name))).remove
                try:
                    out[name][b] = loss()
                finally:
                    undo()
                bar.update(1)
    return out


@torch.no_grad()
def input_sizes(den, solver, calib, layers: dict[str, torch.nn.Module], device="cpu") -> dict[str, int]:
    """The elements of each layer's input in one denoiser call on one stored state (a guided
    call's two branches in every layer alike): the weights of the activations' average width."""
    sizes: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: sizes.__setitem__(n, args[0].numel()))
             for n, m in layers.items()]
    try:
        idx = torch.arange(1)
        den(calib.xs[idx, 0].to(device), solver.timesteps[0], calib.cond.index(idx).to(device))
    finally:
        for h in hooks:
            h.remove()
    return {n: sizes.get(n, 0) for n in layers}


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
    """``config`` with the per-layer widths of its ``mixed_precision`` and ``act_mixed_precision``
    budgets written in ``layer_bits``, and what was measured (for the quantization record)."""
    layers = candidate_layers(den.model, config)
    bits = {n: [config.weight_bits, config.act_bits] for n in layers}
    info: dict = {}
    for kind, budget, col in (("weight", config.mixed_precision, 0), ("act", config.act_mixed_precision, 1)):
        if budget is None:
            continue
        sens = sensitivities(den, solver, calib, config, splits, kind=kind, device=device, progress=progress)
        size = ({n: layers[n].weight.numel() for n in sens} if kind == "weight"
                else input_sizes(den, solver, calib, layers, device))
        chosen = allocate(sens, size, budget)
        total = sum(size.values())
        for n, b in chosen.items():
            bits[n][col] = b
        prefix = "" if kind == "weight" else "act_"
        info.update({f"{prefix}budget": budget,
                     f"average_{kind}_bits": round(sum(size[n] * b for n, b in chosen.items()) / total, 4),
                     f"{prefix}layers_by_width": {str(b): sum(1 for v in chosen.values() if v == b)
                                                  for b in sorted(set(chosen.values()))},
                     f"{prefix}sensitivity": {n: {str(b): v for b, v in s.items()} for n, s in sens.items()}})
    layer_bits = {n: wa for n, wa in bits.items() if wa != [config.weight_bits, config.act_bits]}
    return dataclasses.replace(config, layer_bits=layer_bits or None), info
