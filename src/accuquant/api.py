"""The one entry point: ``quantize(source, config, method=..., calib=...)``.

1. load or copy the full-precision pipeline;
2. collect (or reuse) FP calibration trajectories with the inference solver;
3. wrap the denoiser's layers and attention processors (what the model family needs);
4. calibrate with the method in the engine (:mod:`accuquant.engine`);
5. freeze: weights become integer codes, run by the ``fake`` backend.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from . import cache
from .block_data import parse_size
from .calibration import Trajectories, collect_trajectories
from .config import QuantConfig
from .engine import Run, cached_or_calibrate
from .distributed import is_main, world
from .errors import AccuQuantError
from .layers import freeze_model, wrap_model
from .loading import DTYPES, as_pipeline
from .methods import accuquant, naive, per_step  # noqa: F401  (the built-in methods register themselves)
from .methods.base import METHODS, MethodConfig, method_config
from .pipeline import Pipeline
from .quantizers import UniformQuantizer
from .safety import check_device, check_finite
from .sampling import make_scheduler
from .version import __version__


def _check_calibration(calib: Trajectories, solver, fingerprint: str) -> None:
    """Refuse trajectories of another model, sampler or step count than this calibration's."""
    made_by = calib.meta.get("model")
    if made_by is not None and made_by != fingerprint:
        raise AccuQuantError(f"calibration data: collected from another model (fingerprint {made_by}, this model's "
                             f"{fingerprint}); collect trajectories of this model (omit --calib)")
    if calib.meta.get("solver", solver.name) != solver.name:
        raise AccuQuantError(f"calibration data: collected with the {calib.meta['solver']} sampler, not the "
                             f"{solver.name} sampler this calibration uses (--scheduler)")
    if calib.num_steps != solver.num_steps:
        raise AccuQuantError(f"calibration data: its {calib.num_steps} steps do not match the {solver.name} "
                             f"sampler's {solver.num_steps} (--steps)")
    if not torch.equal(calib.timesteps, solver.timesteps.cpu()):
        raise AccuQuantError(f"calibration data: its timesteps {calib.timesteps.tolist()} are not the {solver.name} "
                             f"sampler's {solver.timesteps.cpu().tolist()} (another scheduler config)")


def calibration_data(pipe: Pipeline, solver, num: int, seed: int, guidance_scale: float | None, cond, batch_size: int,
                     device, progress: bool, use_cache: bool = True) -> Trajectories:
    """FP trajectories for calibration, from the cache when the same set was collected before."""
    den = pipe.denoiser(guidance_scale)
    key = cache.settings_key(pipe.fingerprint(), solver.describe(), num, seed, den.guidance_scale, cond)
    path = cache.cache_dir() / "calib" / f"{key}.safetensors"
    if use_cache and path.is_file():
        try:
            return Trajectories.load(path)
        except AccuQuantError:
            path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt
    # the model's fingerprint goes with the set: a saved set passed to another model is refused
    return collect_trajectories(den, solver, num, seed, cond, batch_size, device, progress,
                                path=path if use_cache else None, meta={"model": pipe.fingerprint()})


def keys(fingerprint: str, config: QuantConfig, mconfig: MethodConfig, calib: Trajectories, seed: int,
         batch_size: int, guidance_scale: float) -> tuple[str, str]:
    """The run key (names the checkpoint: everything the result depends on but the learning
    rates, so that ``--resume`` may continue a diverged run with a smaller one) and the base
    key (the same without the method: names results that other methods start from)."""
    common = {"model": fingerprint, "config": config.to_dict(), "seed": seed, "batch_size": batch_size,
              "g": guidance_scale, "calib": calib.digest()}
    return cache.digest({**common, "method": mconfig.resume_dict()}), cache.digest(common)


def quantize(
    source,
    config: QuantConfig | None = None,
    method: str | MethodConfig = "naive",
    calib: Trajectories | str | Path | None = None,
    *,
    steps: int = 20,
    scheduler: str | None = None,
    calib_samples: int = 64,
    seed: int = 0,
    guidance_scale: float | None = None,
    labels=None,
    prompts: list[str] | None = None,
    batch_size: int = 32,
    micro_batches: int = 1,
    max_memory: str | int = "2GB",
    device: str = "cpu",
    progress: bool = True,
    inplace: bool = False,
    use_cache: bool = True,
    resume: bool = False,
    **method_options,
) -> Pipeline:
    """Quantize a diffusion model.

    Args:
        source: a path (diffusers pipeline or model directory, or hub id), a diffusers
            pipeline, a diffusers model, or an accuquant :class:`Pipeline`.
        config: the quantization config (default: W8A8).
        method: a method name (``"naive"``, ``"per-step"``, ``"accuquant"``) with its options
            as keywords (``iters=``, ``lr=``...), or a method config (``AccuQuantConfig(...)``).
        calib: FP trajectories (or a path to a saved set) to calibrate on; collected
            from ``calib_samples`` seeded noises when ``None``.
        steps, scheduler: the sampler used at inference; calibration follows it.
        calib_samples, seed, labels, prompts: what the calibration trajectories start from.
        guidance_scale: classifier-free guidance scale (default: the model's).
        batch_size: samples per forward pass during calibration.
        micro_batches: passes per optimisation batch (gradient accumulation: less memory,
            the same step up to float rounding). Under ``torch.distributed`` each rank
            computes its share of every batch and the gradients are summed over the ranks
            (:mod:`accuquant.distributed`).
        max_memory: RAM for the data a method captures from the running model (per-step's
            block inputs and outputs: ``"4GB"``, ``"512MB"``, or bytes); what does not fit
            is kept in temporary files and read back by chunks, with the same result.
        device: ``"cpu"`` or ``"cuda"``.
        inplace: quantize ``source``'s own model instead of a copy.
        use_cache: reuse calibration trajectories and results cached by earlier runs.
        resume: continue an interrupted calibration with the same settings from its last
            checkpoint (under ``cache_dir()/runs``; removed when the run finishes).

    Returns:
        the quantized :class:`Pipeline` (weights frozen as integer codes).
    """
    config = config if config is not None else QuantConfig()
    mconfig = method_config(method, method_options)
    max_memory = parse_size(max_memory) if isinstance(max_memory, str) else int(max_memory)
    if int(micro_batches) < 1:
        raise AccuQuantError(f"micro_batches must be at least 1, not {micro_batches}")
    pieces = int(micro_batches) * world()[1]
    smallest = min(batch_size, getattr(mconfig, "traj_batch", batch_size))
    if pieces > smallest:
        raise AccuQuantError(f"a batch of {smallest} cannot be split into {pieces} pieces ({world()[1]} ranks x "
                             f"{micro_batches} micro-batches): use a larger --batch-size or fewer pieces")
    check_device(device)
    pipe = as_pipeline(source, copy_model=not inplace)
    if pipe.quant is not None:
        raise AccuQuantError("the model is already quantized")
    check_finite(pipe.model, type(pipe.model).__name__)
    dtypes = {t.dtype for t in pipe.model.parameters()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES.values():
        raise AccuQuantError(f"the denoiser's parameters are {', '.join(sorted(map(str, dtypes)))}: expected one "
                             "of float32, float16, bfloat16")
    dtype = dtypes.pop()
    if dtype != torch.float32:  # calibrated in float32 (step-size gradients underflow in half precision)
        pipe.model.float()
        cache.forget(pipe.model)
    pipe.to(device)
    solver = make_scheduler(scheduler, pipe.scheduler_config, steps)
    den = pipe.denoiser(guidance_scale)
    fingerprint = pipe.fingerprint()
    t0 = time.perf_counter()
    if calib is None:
        cond = pipe.conditions(calib_samples, labels, prompts, device="cpu")
        calib = calibration_data(pipe, solver, calib_samples, seed, guidance_scale, cond, batch_size, device, progress,
                                 use_cache)
    elif not isinstance(calib, Trajectories):
        calib = Trajectories.load(calib)
    _check_calibration(calib, solver, fingerprint)
    if tuple(calib.xs.shape[2:]) != den.sample_shape:
        raise AccuQuantError(f"calibration data: samples of shape {tuple(calib.xs.shape[2:])} do not fit this model "
                             f"({den.sample_shape})")
    den.check_conditions(calib.cond, "calibration data")
    if config.keep_fp is None:  # the family's defaults, written out so that the saved config says them
        config = dataclasses.replace(config, keep_fp=den.keep_fp)
    report = wrap_model(pipe.model, config, den.shortcut_splits())
    cache.forget(pipe.model)  # changed in place: not the FP model any more
    pipe.to(device)
    key, base_key = keys(fingerprint, config, mconfig, calib, seed, batch_size, den.guidance_scale)
    run = Run(den, solver, calib, config, batch_size, device, progress and is_main(), seed,
              checkpoint=cache.cache_dir() / "runs" / f"{key}.safetensors", resume=resume, key=key,
              base_key=base_key, result_cache=cache.cache_dir() / "results" if use_cache else None,
              micro_batches=int(micro_batches), max_memory=max_memory)
    t1 = time.perf_counter()
    # a method with its default options may come from an earlier run's result; every result
    # is kept for later runs (AccuQuant's start)
    run.log.update(cached_or_calibrate(run, mconfig, reuse=mconfig.is_default()))
    if is_main():
        run.checkpoint.unlink(missing_ok=True)
    freeze_model(pipe.model)
    if dtype != torch.float32:  # back to the user's dtype, the kernels rebuilt from the codes in it
        pipe.model.to(dtype)
        bad = [n for n, q in pipe.model.named_modules() if isinstance(q, UniformQuantizer) and q.scale is not None
               and not (torch.isfinite(q.scale).all() and (q.scale > 0).all())]
        if bad:
            raise AccuQuantError(f"{len(bad)} step sizes (first: {bad[0]}) are not representable in {dtype}: "
                                 "quantize the model in float32 or bfloat16")
        freeze_model(pipe.model)
    pipe.model.eval()
    pipe.quant = {
        "config": config.to_dict(),
        "splits": report.split,
        "report": report.to_dict(),
        "method": mconfig.NAME,
        "method_version": mconfig.VERSION,
        "method_options": method_options,
        "method_config": mconfig.to_dict(),
        "calibration": {"samples": calib.num_samples, "seed": calib.meta.get("seed"), "solver": solver.name,
                        "steps": steps, "guidance_scale": den.guidance_scale},
        "method_log": run.log,
        "timing_s": {"calibration_data": round(t1 - t0, 3), "method": round(time.perf_counter() - t1, 3)},
        "accuquant_version": __version__,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return pipe
