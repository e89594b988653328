"""EDA-DM (Liu et al., arXiv 2401.04585), on per-step: calibration points chosen per step
by density and variety, and layer outputs in the block loss.

* **Points (TDAC):** every step's feature map (the input of the middle reconstruction
  block, run in FP on ``feature_samples`` calibration trajectories) is compared with every
  other step's: its density ``D_t`` counts the steps within mean squared distance ``r`` of
  it (``r``: the median distance between two steps), its variety ``V_t`` sums one minus the
  cosine similarity along channels over samples and positions. Both are scaled to [0, 1];
  step ``t`` gets ``round(N w_t / sum w)`` of the ``N = samples_per_step x steps`` points,
  ``w_t = D_t + variety_weight V_t`` (the rounding's excess or shortfall taken from, or
  given to, the steps with the largest shares).
* **Loss (FBR):** a block's output error plus ``layer_weight`` times the error of every
  quantized layer's output inside it but the last, against the same layers of the FP block
  at the same input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibrate.block_data import block_outputs, quantization_disabled
from ..calibrate.blocks import Block, find_blocks
from ..calibrate.protocol import Run
from ..config import option
from .per_step import PerStep, PerStepConfig, _block_loss, _rec_loss, output_loss
from .registry import register_method


@dataclass
class EDADMConfig(PerStepConfig):
    NAME = "eda-dm"
    variety_weight: float = option(1.0, "weight of a step's variety against its density when points are shared "
                                   "out (lambda)", minimum=0)
    layer_weight: float = option(1.0, "weight of the layers' output errors in a block's loss", minimum=0)
    feature_samples: int = option(16, "calibration trajectories whose features score the steps", cli=False,
                                  minimum=1)


def step_scores(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Density and variety of every step (see the module docstring), each scaled to [0, 1];
    ``features[t]``: step ``t``'s feature map of the same samples (``B, C, ...``)."""
    # B, C, positions: a conv map's channels are dim 1, a token sequence's (B, N, D) the last
    f = torch.stack([(x.transpose(1, 2) if x.dim() == 3 else x).double().flatten(2) if x.dim() > 2
                     else x.double().unsqueeze(-1) for x in features])
    s = len(features)
    mse = torch.stack([((f - f[t]) ** 2).flatten(1).mean(1) for t in range(s)])  # S x S
    off = ~torch.eye(s, dtype=torch.bool)
    r = mse[off].median() if s > 1 else torch.tensor(0.0)
    density = ((mse <= r) & off).sum(1).double()
    unit = f / f.norm(dim=2, keepdim=True).clamp_min(1e-12)  # S, B, C, P: along channels
    variety = torch.stack([(1 - (unit * unit[t]).sum(2))[off[t]].sum() for t in range(s)])

    def scaled(v):
        span = v.max() - v.min()
        return (v - v.min()) / span if span > 0 else torch.zeros_like(v)

    return scaled(density), scaled(variety)


def allocation(weights: torch.Tensor, total: int) -> list[int]:
    """``round(total w_t / sum w)`` points per step, summing to ``total`` (the difference
    from rounding added to, or taken from, the largest shares first); equal shares if every
    weight is 0."""
    w = weights.double()
    if float(w.sum()) <= 0:
        w = torch.ones_like(w)
    n = torch.round(total * w / w.sum()).long()
    order = torch.argsort(w, descending=True, stable=True)
    k = 0
    while int(n.sum()) != total:
        j = order[k % len(order)]
        if int(n.sum()) < total:
            n[j] += 1
        elif n[j] > 0:
            n[j] -= 1
        k += 1
    return n.tolist()


@register_method
class EDADM(PerStep):
    """Per-step with EDA-DM's points and loss (see the module docstring)."""

    Config = EDADMConfig

    def calibration_points(self, run: Run) -> list[tuple[int, int]]:
        c, calib = self.config, run.calib
        n, steps = calib.num_samples, calib.num_steps
        idx = torch.arange(min(n, c.feature_samples))
        first = next(calib.batches([(int(k), 0) for k in idx], len(idx), run.device))
        blocks = find_blocks(run.model, lambda: run.denoiser(*first), run.denoiser.block_types)
        middle = blocks[len(blocks) // 2].module
        feats: list[torch.Tensor] = []

        def keep(module, args, kwargs):  # a transformer block may take its input by keyword
            x = args[0] if args else kwargs.get("hidden_states", next(v for v in kwargs.values() if torch.is_tensor(v)))
            feats.append(x.detach().float().cpu())

        hook = middle.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            with torch.no_grad(), quantization_disabled(run.model):
                for i in range(steps):
                    x, t, cond = next(calib.batches([(int(k), i) for k in idx], len(idx), run.device))
                    run.denoiser(x, t, cond)
                    del feats[i + 1:]  # the first call of the block per step (a second one: the other branch)
        finally:
            hook.remove()
        density, variety = step_scores(feats)
        counts = allocation(density + c.variety_weight * variety, c.samples_per_step * steps)
        g = torch.Generator().manual_seed(run.seed)
        pairs = [(int(k), i) for i, m in enumerate(counts) for k in torch.randperm(n, generator=g)[:m]]
        run.log["points_per_step"] = [min(m, n) for m in counts]
        order = torch.randperm(len(pairs), generator=g)
        return [pairs[j] for j in order]

    def block_loss(self, block: Block, batch) -> torch.Tensor:
        c = self.config
        if c.layer_weight == 0:
            return _block_loss(block, batch)
        args, kwargs, target = batch
        layers = block.layers

        def capture(store):
            return [lyr.register_forward_hook(lambda m, a, o, k=k: store.__setitem__(k, o)) for k, lyr in
                    enumerate(layers)]

        fp: dict[int, torch.Tensor] = {}
        handles = capture(fp)
        try:
            with torch.no_grad(), quantization_disabled(block.module):
                block.module(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        q: dict[int, torch.Tensor] = {}
        handles = capture(q)
        try:
            out = block_outputs(block.module(*args, **kwargs))
        finally:
            for h in handles:
                h.remove()
        loss = output_loss(out, target)
        inner = list(q)[:-1]  # in the order they ran; the last is (close to) the block's output
        if inner:
            loss = loss + c.layer_weight * sum(_rec_loss(q[k], fp[k]) for k in inner)
        return loss
