"""Per-step calibration, Q-Diffusion style: time-step-aware data and block reconstruction.

Every denoising step is calibrated on its own: a block learns to reproduce, at one
step's input ``x_t``, what the full-precision block returns there.

* **Data:** ``samples_per_step`` points ``(x_t, t, cond)`` per sampling step from the FP
  trajectories (the inference solver and steps), shuffled across steps; a guided model
  runs both branches, so both are in the data.
* **Units:** the reconstruction blocks in execution order (:mod:`accuquant.blocks`). For
  each, its inputs in the *quantized* network (earlier blocks calibrated) and its outputs
  in the *FP* network (quantizers off) are captured in bounded chunks (:mod:`accuquant.block_data`).
* **Phase 1, AdaRound:** the rounding of every weight quantizer of the block (both parts
  of a split layer, the annealed regulariser on all of them), activation quantization on.
* **Phase 2, LSQ:** the block's activation step sizes, rounding now hard, at a rate
  relative to each step size.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

from ..calibrate.block_data import block_outputs, collect
from ..calibrate.blocks import Block, find_blocks
from ..cache import derive_seed
from ..calibrate.protocol import Group, Method, Phase, Run, Unit
from ..quant.layers import outlier_parameters
from ..quant.quantizers import annealed_beta
from ..quant.rounding import harden, learnable_rounding, penalty, weight_quantizers
from ..config import MethodConfig, option
from .registry import register_method, start_from


@dataclass
class PerStepConfig(MethodConfig):
    NAME = "per-step"
    RETIRED = ("max_ram_mb", "spill_dir")  # now Run.max_memory and Run.spill_dir (--max-memory)
    iters: int = option(300, "AdaRound iterations per block", minimum=0)
    lr: float = option(1e-2, "learning rate of the rounding variables", positive=True, rate=True)
    act_iters: int = option(100, "activation step-size iterations per block", minimum=0)
    act_lr: float = option(1e-3, "learning rate of activation step sizes, relative to each step size", positive=True,
                           rate=True)
    outlier_lr: float = option(1e-4, "learning rate of the outlier transforms (smoothing scales' logs, low-rank "
                               "factors), learned with the activation step sizes", positive=True, rate=True)
    samples_per_step: int = option(32, "calibration points per sampling step (all trajectories if fewer)", minimum=1)
    reg_weight: float = option(0.01, "weight of AdaRound's rounding regulariser", cli=False, minimum=0)
    warmup: float = option(0.2, "fraction of the AdaRound iterations without the regulariser", cli=False, minimum=0)
    beta_start: float = option(20.0, "annealing of the regulariser's exponent: start", cli=False, positive=True)
    beta_end: float = option(2.0, "annealing of the regulariser's exponent: end", cli=False, positive=True)


def _rec_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BRECQ's reconstruction loss: squared error summed over channels (dim 1), averaged over the rest."""
    d = (out - target).pow(2)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def output_loss(out, target) -> torch.Tensor:
    """The reconstruction loss of a block's output; of a block with several outputs (an MMDiT
    block's image and text streams), the sum over them."""
    if isinstance(target, tuple):
        return sum(_rec_loss(o, t) for o, t in zip(out, target))
    return _rec_loss(out, target)


def _block_loss(block: Block, batch) -> torch.Tensor:
    """The reconstruction loss of a block at a batch of its captured data."""
    args, kwargs, target = batch
    return output_loss(block_outputs(block.module(*args, **kwargs)), target)


@register_method
class PerStep(Method):
    """Q-Diffusion-style block reconstruction (see the module docstring)."""

    Config = PerStepConfig

    def initialise(self, run: Run) -> None:
        start_from(run, "naive")  # naive's ranges, kept for the naive method itself

    def rounding_layers(self, run: Run, layers: dict) -> dict:
        """The layers of a block whose rounding its reconstruction learns (all of them)."""
        return layers

    def calibration_points(self, run: Run) -> list[tuple[int, int]]:
        """The ``(trajectory, step)`` points calibrated on: ``samples_per_step`` at every step."""
        return run.calib.points(self.config.samples_per_step, run.seed)

    def block_loss(self, block: Block, batch) -> torch.Tensor:
        """What a block's reconstruction minimises: its output's error (:func:`_block_loss`)."""
        return _block_loss(block, batch)

    def units(self, run: Run) -> list[Unit]:
        points = self.calibration_points(run)
        first = next(run.calib.batches(points[: run.batch_size], run.batch_size, run.device))
        run.log["points"] = len(points)
        return [Unit(b.name, self.config.iters + self.config.act_iters, partial(self._open, run, b, points))
                for b in find_blocks(run.model, lambda: run.denoiser(*first), run.denoiser.block_types)]

    @contextmanager
    def _open(self, run: Run, block: Block, points, index: int):
        c, t0 = self.config, time.perf_counter()
        data = collect(run.denoiser, block.module, run.calib.batches(points, run.batch_size, run.device),
                       max(256, 4 * run.batch_size), run.max_memory, run.spill_dir)
        try:
            probe = data.batch(torch.Generator().manual_seed(derive_seed(c.NAME, run.seed, -1 - index)),
                               4 * run.batch_size, run.device)
            with torch.no_grad():
                before = _block_loss(block, probe).item()
            layers = {f"{block.name}.{n}" if n else block.name: m for n, m in block.module.named_modules()
                      if m in block.layers}
            rounded = self.rounding_layers(run, layers)
            warm = int(c.warmup * c.iters)

            def rounding_loss(gen, it):
                loss = self.block_loss(block, data.batch(gen, run.batch_size, run.device, run.shard))
                if it < warm:
                    return loss
                beta = annealed_beta((it - warm) / max(1, c.iters - warm), c.beta_start, c.beta_end)
                return loss + c.reg_weight * penalty(weight_quantizers(rounded), beta)

            def act_steps(resumed):
                quants = [q for q in block.act_quant if q.enabled]
                extra = outlier_parameters(layers)
                return [Group({f"{block.name}.act.{k}": q.scale for k, q in enumerate(quants)}, c.act_lr, True),
                        *([Group(extra, c.outlier_lr)] if extra else [])]

            yield [Phase("rounding", c.iters, lambda resumed: [Group(learnable_rounding(rounded), c.lr)],
                         rounding_loss, end=lambda: harden(rounded)),
                   Phase("act steps", c.act_iters, act_steps,
                         lambda gen, it: self.block_loss(block, data.batch(gen, run.batch_size, run.device,
                                                                           run.shard)))]
            with torch.no_grad():
                after = _block_loss(block, probe).item()
            run.log.setdefault("blocks", {})[block.name] = {
                "loss_naive": before, "loss": after, "rows": data.rows, "rows_captured": data.captured,
                "chunks_on_disk": data.on_disk,
                "data_ram_peak_mb": round(data.peak_ram_bytes / 2**20, 2),
                "seconds": round(time.perf_counter() - t0, 2)}
        finally:
            data.close()
