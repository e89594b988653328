"""TFMQ-DM's temporal-information-aware reconstruction (Huang et al., CVPR 2024), on per-step.

The temporal path of a denoiser (the time-embedding MLP and every block's projection of
the embedding: the layers the family's adapter names in ``temporal_layers``) depends on
the timestep, and the class, alone. TFMQ-DM calibrates it on its own, against the FP
temporal features, before the blocks; the blocks' reconstruction then leaves its layers'
rounding as it is.

* **Unit 1, temporal:** AdaRound of every temporal layer's weight rounding, on the sum
  over those layers of the squared error of their outputs against the FP model's at the
  same calibration points (a forward pass stops once the last temporal layer has run; each
  layer sees its quantized input, and the gradient stops between layers, so the rest of
  the network builds no graph).
* **Then per-step** (:mod:`.per_step`), with the temporal layers' rounding fixed.

Not built: the finite set calibration of the temporal activations (one range per sampling
step): see docs/methods.md.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..calibrate.block_data import quantization_disabled
from ..calibrate.protocol import Group, Phase, Run, Unit
from ..config import option
from ..quant.layers import matches, quant_layers
from ..quant.quantizers import annealed_beta
from ..quant.rounding import harden, learnable_rounding, penalty, weight_quantizers
from .per_step import PerStep, PerStepConfig
from .registry import register_method


@dataclass
class TFMQConfig(PerStepConfig):
    NAME = "tfmq"
    temporal_iters: int = option(300, "AdaRound iterations of the temporal path, reconstructed on its own", minimum=0)


class _Stop(Exception):
    """Raised by the last temporal layer: the rest of the forward pass is not needed."""


def temporal_layers(run: Run) -> dict:
    """The quantized layers of the family's temporal path (``Denoiser.temporal_layers``)."""
    return {n: lyr for n, lyr in quant_layers(run.model).items()
            if lyr.weight_quant and matches(n, run.denoiser.temporal_layers)}


def temporal_outputs(run: Run, layers: dict, x, t, cond) -> dict[str, torch.Tensor]:
    """Every temporal layer's output in one forward pass, stopped after the last of them;
    the outputs go on detached, so the gradient stays inside each layer."""
    outs: dict[str, torch.Tensor] = {}

    def hook(name):
        def keep(module, args, out):
            outs[name] = out
            if len(outs) == len(layers):
                raise _Stop
            return out.detach()
        return keep

    handles = [lyr.register_forward_hook(hook(n)) for n, lyr in layers.items()]
    try:
        run.denoiser(x, t, cond)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return outs


@register_method
class TFMQ(PerStep):
    """Per-step with the temporal path reconstructed first (see the module docstring)."""

    Config = TFMQConfig

    def rounding_layers(self, run: Run, layers: dict) -> dict:
        return {n: lyr for n, lyr in layers.items() if id(lyr) not in self.temporal_ids}

    def units(self, run: Run) -> list[Unit]:
        layers = temporal_layers(run)
        self.temporal_ids = set(map(id, layers.values()))  # the blocks' units leave these out
        run.log["temporal_layers"] = list(layers)
        blocks = super().units(run)
        if not layers:  # the family has none, or keeps them in full precision: per-step
            return blocks
        points = run.calib.points(self.config.samples_per_step, run.seed)
        return [Unit("temporal", self.config.temporal_iters, lambda index: self._temporal(run, layers, points)),
                *blocks]

    @contextmanager
    def _temporal(self, run: Run, layers: dict, points):
        c = self.config
        warm = int(c.warmup * c.temporal_iters)

        def error(gen) -> torch.Tensor:
            pick = torch.randint(len(points), (run.batch_size,), generator=gen)
            x, t, cond = next(run.calib.batches([points[int(k)] for k in pick], run.batch_size, run.device))
            with torch.no_grad(), quantization_disabled(run.model):
                target = temporal_outputs(run, layers, x, t, cond)
            out = temporal_outputs(run, layers, x, t, cond)
            return sum((out[n] - target[n]).pow(2).sum(-1).mean() for n in layers)

        def loss(gen, it):
            if it < warm:
                return error(gen)
            beta = annealed_beta((it - warm) / max(1, c.temporal_iters - warm), c.beta_start, c.beta_end)
            return error(gen) + c.reg_weight * penalty(weight_quantizers(layers), beta)

        def end():
            harden(layers)
            with torch.no_grad():
                run.log["temporal_error"] = round(float(error(torch.Generator().manual_seed(run.seed))), 6)

        yield [Phase("temporal", c.temporal_iters, lambda resumed: [Group(learnable_rounding(layers), c.lr)], loss,
                     end=end)]
