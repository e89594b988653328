"""Per-step calibration, Q-Diffusion style: time-step-aware data and block reconstruction.

Every denoising step is calibrated on its own: the objective of a block is to reproduce,
at one step's input ``x_t``, what the full-precision block returns. In detail:

* **Data:** ``samples_per_step`` points ``(x_t, t, cond)`` per sampling step, drawn from the
  stored FP trajectories (the same solver and steps as at inference), shuffled across
  steps. Guided models run both branches (conditional and unconditional) in one batch,
  so both are in the data.
* **Blocks:** ResNet blocks, transformer blocks, attention blocks, samplers, the time
  embedding, and lone layers, in execution order (:mod:`accuquant.blocks`). For each
  block, its input in the *quantized* network (earlier blocks already calibrated) and
  its output in the *full-precision* network (quantizers disabled: the weights are not
  held twice) are captured in bounded chunks (:mod:`accuquant.block_data`).
* **Weights:** AdaRound (learned rounding of every weight quantizer, both parts of a
  split layer, the annealed rounding regulariser on all of them) with the per-channel
  step sizes of the naive initialisation, activation quantization on.
* **Activations:** then the activation step sizes of the block (layer inputs and
  attention matmul inputs) are learned with LSQ gradients, rounding now hard.
* **Resume:** a checkpoint is written after each block; ``resume`` continues from the last
  finished block. Each block's random stream depends only on the seed and its index, so
  a resumed run gives the same result as an uninterrupted one.

Options (``quantize(..., method="per-step", iters=..., ...)``): see :data:`DEFAULTS`.
"""

from __future__ import annotations

import hashlib
import time

import torch

from ..block_data import BlockData, capture, quantization_disabled
from ..blocks import Block, find_blocks
from ..checkpoint import load_quantizers, read_checkpoint, save_checkpoint
from ..progress import progress_bar
from . import CalibrationContext, method_options, register_method, weights_frozen
from ..quantizers import annealed_beta
from .naive import init_act_ranges, init_weight_ranges

#: Options and their defaults.
DEFAULTS = {
    "iters": 300,  # AdaRound iterations per block
    "lr": 1e-2,  # Adam learning rate of the rounding variables
    "act_iters": 100,  # activation step-size iterations per block
    "act_lr": 1e-3,  # Adam learning rate of activation step sizes, relative (see _act_phase)
    "samples_per_step": 32,  # calibration points per sampling step (all trajectories if fewer)
    "reg_weight": 0.01,  # weight of AdaRound's rounding regulariser
    "warmup": 0.2,  # fraction of the AdaRound iterations without the regulariser
    "beta_start": 20.0,  # annealing of the regulariser's exponent, start...
    "beta_end": 2.0,  # ...and end
    "max_ram_mb": 2048,  # block data beyond this goes to disk
    "spill_dir": None,  # where block data goes on disk (default: the system's temp folder)
    "act_calib_pairs": None,  # (naive initialisation) points used for the activation ranges
}


def _block_seed(seed: int, index: int) -> int:
    h = hashlib.sha256(f"per-step:{seed}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def calibration_points(ctx: CalibrationContext, per_step: int, seed: int) -> list[tuple[int, int]]:
    """``(trajectory, step)`` pairs: ``per_step`` random trajectories at every step, shuffled."""
    n, s = ctx.calib.num_samples, ctx.calib.num_steps
    per_step = max(1, min(n, per_step))
    g = torch.Generator().manual_seed(seed)
    pairs = [(int(k), i) for i in range(s) for k in torch.randperm(n, generator=g)[:per_step]]
    order = torch.randperm(len(pairs), generator=g)
    return [pairs[j] for j in order]


def point_batches(ctx: CalibrationContext, points: list[tuple[int, int]]):
    """Yield ``(x_t, t, cond)`` batches of ``ctx.batch_size`` points (one timestep per sample)."""
    calib = ctx.calib
    for start in range(0, len(points), ctx.batch_size):
        chunk = points[start : start + ctx.batch_size]
        k = torch.tensor([p[0] for p in chunk])
        i = torch.tensor([p[1] for p in chunk])
        x = calib.xs[k, i].to(ctx.device)
        t = calib.timesteps[i].to(ctx.device)
        cond = calib.cond.index(k).to(ctx.device) if len(calib.cond) else calib.cond
        yield x, t, cond


def collect_block_data(ctx: CalibrationContext, block: Block, points, opts) -> BlockData:
    """The block's inputs in the quantized network and its outputs in the FP network."""
    data = BlockData(chunk_rows=max(256, 4 * ctx.batch_size), max_ram_mb=opts["max_ram_mb"],
                     spill_dir=opts["spill_dir"])
    den = ctx.denoiser
    for x, t, cond in point_batches(ctx, points):
        def run(x=x, t=t, cond=cond):
            return den(x, t, cond)

        args, kwargs = capture(block.module, run, "input")
        with quantization_disabled(den.model):
            target = capture(block.module, run, "output")
        data.add(args, kwargs, target)
    return data.finish()


def _rec_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BRECQ's reconstruction loss: squared error summed over channels (dim 1), averaged over the rest."""
    d = (out - target).pow(2)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def _forward(block: Block, args, kwargs) -> torch.Tensor:
    out = block.module(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _eval_loss(block: Block, batch) -> float:
    args, kwargs, target = batch
    return _rec_loss(_forward(block, args, kwargs), target).item()


def _show(bar, it: int, loss: torch.Tensor, phase: str) -> None:
    if bar is not None and it % 25 == 0:
        bar.set_postfix_str(f"{phase} {it}: loss {loss.item():.4g}", refresh=True)


def _adaround_phase(ctx, block: Block, data: BlockData, opts, gen, bar=None) -> None:
    quants, alphas = [], []
    for layer in block.layers:
        # Every part of a split layer learns its rounding (Q-Diffusion's code left the second half out).
        for q, part in layer.weight_parts():
            q.enable_learned_rounding(part)
            quants.append(q)
            alphas.append(q.alpha)
    if not quants:
        return
    iters = int(opts["iters"])
    opt = torch.optim.Adam(alphas, lr=opts["lr"])
    warm = int(opts["warmup"] * iters)
    for it in range(iters):
        args, kwargs, target = data.batch(gen, ctx.batch_size, ctx.device)
        rec = _rec_loss(_forward(block, args, kwargs), target)
        loss = rec
        if it >= warm:
            frac = (it - warm) / max(1, iters - warm)
            beta = annealed_beta(frac, opts["beta_start"], opts["beta_end"])
            # The regulariser covers every weight quantizer of the block, split halves included.
            loss = rec + opts["reg_weight"] * sum(q.rounding_regularizer(beta) for q in quants)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _show(bar, it, rec, "rounding")
    for q in quants:
        q.soft_rounding = False
        q.alpha.requires_grad_(False)


def _act_phase(ctx, block: Block, data: BlockData, opts, gen, bar=None) -> None:
    quants = [q for q in block.act_quant if q.enabled]
    iters = int(opts["act_iters"])
    if not quants or iters <= 0:
        return
    # LSQ gradients (autograd through x / s and * s). Adam moves a parameter by about its
    # learning rate per step, so each step size gets ``act_lr`` times its own initial
    # magnitude: one setting fits step sizes of very different scales.
    groups = [{"params": [q.scale], "lr": opts["act_lr"] * float(q.scale.detach().abs().max())} for q in quants]
    for q in quants:
        q.scale.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    try:
        for it in range(iters):
            args, kwargs, target = data.batch(gen, ctx.batch_size, ctx.device)
            loss = _rec_loss(_forward(block, args, kwargs), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _show(bar, it, loss, "act steps")
            with torch.no_grad():
                for q in quants:
                    q.scale.clamp_(min=1e-8)
    finally:
        for q in quants:
            q.scale.requires_grad_(False)


@register_method("per-step", DEFAULTS)
def per_step(ctx: CalibrationContext) -> None:
    """Q-Diffusion-style block reconstruction (see the module docstring)."""
    opts = method_options(ctx, DEFAULTS, "per-step")
    with weights_frozen(ctx.denoiser.model):
        _run(ctx, opts)


def _run(ctx: CalibrationContext, opts: dict) -> None:
    model = ctx.denoiser.model
    points = calibration_points(ctx, int(opts["samples_per_step"]), ctx.seed)
    first = next(point_batches(ctx, points[: ctx.batch_size]))
    blocks = find_blocks(model, lambda: ctx.denoiser(*first))
    start = 0
    state = read_checkpoint(ctx.checkpoint, ctx.run_key) if (ctx.resume and ctx.checkpoint) else None
    if state is not None:
        start, tensors, _ = state
        load_quantizers(model, tensors)
        ctx.log["resumed_at_block"] = start
    else:
        init_weight_ranges(ctx)
        init_act_ranges(ctx)
        if ctx.checkpoint is not None:
            save_checkpoint(ctx.checkpoint, model, ctx.run_key, 0)
    log = ctx.log.setdefault("blocks", {})
    ctx.log["points"] = len(points)
    with progress_bar(len(blocks), "per-step blocks", disable=not ctx.progress) as bar:
        bar.update(start)
        for b in range(start, len(blocks)):
            block = blocks[b]
            bar.set_description(f"per-step {block.name}")
            t0 = time.perf_counter()
            data = collect_block_data(ctx, block, points, opts)
            try:
                gen = torch.Generator().manual_seed(_block_seed(ctx.seed, b))
                probe = data.batch(torch.Generator().manual_seed(_block_seed(ctx.seed, -1 - b)),
                                   4 * ctx.batch_size, ctx.device)
                before = _eval_loss(block, probe)
                with torch.enable_grad():
                    shown = bar if ctx.progress else None
                    _adaround_phase(ctx, block, data, opts, gen, shown)
                    _act_phase(ctx, block, data, opts, gen, shown)
                after = _eval_loss(block, probe)
                log[block.name] = {"loss_naive": before, "loss": after, "rows": data.rows,
                                   "chunks_on_disk": data.on_disk, "seconds": round(time.perf_counter() - t0, 2)}
            finally:
                data.close()
            if ctx.checkpoint is not None:
                save_checkpoint(ctx.checkpoint, model, ctx.run_key, b + 1)
            bar.set_postfix_str(f"block loss {before:.3g} -> {after:.3g}")
            bar.update(1)
