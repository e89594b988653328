"""The one entry point: ``quantize(source, config, method=..., calib=...)``, in three parts.

1. :func:`prepare`: load or copy the full-precision pipeline, collect (or reuse) FP
   calibration trajectories with its solver, and wrap the denoiser's layers and attention
   processors as its model family says;
2. calibrate with the method in the engine, or take its stored result
   (:func:`accuquant.methods.cached_or_calibrate`);
3. :func:`freeze`: weights become integer codes, run by the ``fake`` backend, and the
   pipeline gets its :class:`~accuquant.pipeline.QuantRecord`.

Its defaults are the command line's (:mod:`accuquant.config`): ``quantize(pipe)`` is
AccuQuant at W4A8 with 20 steps and 64 calibration trajectories.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cache
from .calibrate.block_data import quantization_disabled
from .calibrate.data import Trajectories, collect_trajectories
from .calibrate.distributed import is_main, world
from .calibrate.protocol import Run
from .config import (DEFAULT_BATCH_SIZE, DEFAULT_CALIB_SAMPLES, DEFAULT_MAX_MEMORY, DEFAULT_METHOD, DEFAULT_STEPS,
                     MethodConfig, QuantConfig, parse_size)
from .errors import AccuQuantError, check_device, check_finite
from .io.load import DTYPES, as_pipeline
from .methods import RECIPES, cached_or_calibrate, method_config, resolve_recipe
from .methods.corrections import CORRECTIONS, split_method
from .pipeline import Pipeline, QuantRecord
from .quant.layers import WrapReport, freeze_model
from .quant.quantizers import UniformQuantizer
from .sampling import Solver
from .version import __version__


def _check_calibration(calib: Trajectories, solver: Solver, fingerprint: str) -> None:
    """Refuse trajectories of another model, sampler or step count than this calibration's."""
    made_by = calib.meta.get("model")
    if made_by is not None and made_by != fingerprint:
        raise AccuQuantError(f"calibration data: collected from another model (fingerprint {made_by}, this model's "
                             f"{fingerprint}); collect trajectories of this model (give no calibration data)")
    if calib.meta.get("solver", solver.name) != solver.name:
        raise AccuQuantError(f"calibration data: collected with the {calib.meta['solver']} sampler, not the "
                             f"{solver.name} sampler this calibration uses")
    if calib.num_steps != solver.num_steps:
        raise AccuQuantError(f"calibration data: its {calib.num_steps} steps do not match the {solver.name} "
                             f"sampler's {solver.num_steps}")
    if not torch.equal(calib.timesteps, solver.timesteps.cpu()):
        raise AccuQuantError(f"calibration data: its timesteps {calib.timesteps.tolist()} are not the {solver.name} "
                             f"sampler's {solver.timesteps.cpu().tolist()} (another scheduler config)")


def calibration_data(pipe: Pipeline, solver: Solver, num: int, seed: int, guidance_scale: float | None, cond,
                     batch_size: int, device, progress: bool, use_cache: bool = True) -> Trajectories:
    """FP trajectories for calibration, from the cache when the same set was collected before."""
    den = pipe.denoiser(guidance_scale)
    path = cache.trajectories_path(cache.settings_key(pipe.fingerprint(), solver.describe(), num, seed,
                                                      den.guidance_scale, cond))
    if use_cache and path.is_file():
        try:
            return Trajectories.load(path)
        except AccuQuantError:
            path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt
    # the model's fingerprint goes with the set: a saved set passed to another model is refused
    return collect_trajectories(den, solver, num, seed, cond, batch_size, device, progress,
                                path=path if use_cache else None, meta={"model": pipe.fingerprint()})


@dataclass
class Prepared:
    """A pipeline wrapped for calibration, what it calibrates on, and the run for the engine."""

    pipe: Pipeline
    run: Run
    config: QuantConfig
    report: WrapReport
    dtype: torch.dtype
    seconds: float


def prepare(source, config: QuantConfig, mconfig: MethodConfig, calib=None, *, steps: int = DEFAULT_STEPS,
            scheduler: str | None = None, calib_samples: int = DEFAULT_CALIB_SAMPLES, seed: int = 0,
            guidance_scale: float | None = None, labels=None, prompts: list[str] | None = None,
            batch_size: int = DEFAULT_BATCH_SIZE, micro_batches: int = 1, max_memory: str | int = DEFAULT_MAX_MEMORY,
            device: str = "cpu", progress: bool = True, inplace: bool = False, use_cache: bool = True,
            resume: bool = False) -> Prepared:
    """Checks, the FP pipeline in float32 on ``device``, its calibration data, and its
    layers wrapped (see :func:`quantize` for the arguments)."""
    max_memory = parse_size(max_memory)
    if int(micro_batches) < 1:
        raise AccuQuantError(f"micro_batches must be at least 1, not {micro_batches}")
    pieces = int(micro_batches) * world()[1]
    smallest = min(batch_size, getattr(mconfig, "traj_batch", batch_size))
    if pieces > smallest:
        raise AccuQuantError(f"a batch of {smallest} cannot be split into {pieces} pieces ({world()[1]} ranks x "
                             f"{micro_batches} micro-batches): use a larger batch size or fewer pieces")
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
    solver = pipe.solver(steps, scheduler)
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
    config = den.resolve(config)
    mixed = None
    if (config.mixed_precision is not None or config.act_mixed_precision is not None) and config.layer_bits is None:
        from .calibrate.mixed import mixed_config

        splits = den.shortcut_splits() if config.split_shortcut else {}
        config, mixed = mixed_config(den, solver, calib, config, splits, device, progress and is_main())
    report = den.wrap(config)
    cache.forget(pipe.model)  # changed in place: not the FP model any more
    pipe.to(device)
    key, base_key = cache.run_keys(fingerprint, config.to_dict(), mconfig.resume_dict(), calib.digest(), seed,
                                   batch_size, den.guidance_scale)
    run = Run(den, solver, calib, config, batch_size, device, progress and is_main(), seed,
              checkpoint=cache.checkpoint_path(key), resume=resume, key=key, base_key=base_key,
              result_cache=cache.results_dir() if use_cache else None, micro_batches=int(micro_batches),
              max_memory=max_memory)
    if mixed is not None:
        run.log["mixed_precision"] = mixed
    return Prepared(pipe, run, config, report, dtype, time.perf_counter() - t0)


def freeze(prep: Prepared, record: QuantRecord) -> Pipeline:
    """Weights to integer codes (in the user's dtype again), the model in eval mode, and
    the record attached."""
    model = prep.pipe.model
    freeze_model(model)
    if prep.dtype != torch.float32:  # back to the user's dtype, the kernels rebuilt from the codes in it
        model.to(prep.dtype)
        bad = [n for n, q in model.named_modules() if isinstance(q, UniformQuantizer) and q.scale is not None
               and not (torch.isfinite(q.scale).all() and (q.scale > 0).all())]
        if bad:
            raise AccuQuantError(f"{len(bad)} step sizes (first: {bad[0]}) are not representable in {prep.dtype}: "
                                 "quantize the model in float32 or bfloat16")
        freeze_model(model)
    model.eval()
    prep.pipe.quant = record
    return prep.pipe


def quantize(
    source,
    config: QuantConfig | None = None,
    method: str | MethodConfig = DEFAULT_METHOD,
    calib: Trajectories | str | Path | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    scheduler: str | None = None,
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
    seed: int = 0,
    guidance_scale: float | None = None,
    labels=None,
    prompts: list[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    micro_batches: int = 1,
    max_memory: str | int = DEFAULT_MAX_MEMORY,
    device: str = "cpu",
    progress: bool = True,
    inplace: bool = False,
    use_cache: bool = True,
    resume: bool = False,
    correct: str | None = None,
    **method_options,
) -> Pipeline:
    """Quantize a diffusion model.

    Args:
        source: a path (diffusers pipeline or model directory, or hub id), a diffusers
            pipeline, a diffusers model, or an accuquant :class:`Pipeline`.
        config: the quantization config (default: ``QuantConfig()``, W4A8).
        method: a method name (``"naive"``, ``"per-step"``, ``"accuquant"``, the default) with
            its options as keywords (``iters=``, ``lr=``...), or a method config
            (``AccuQuantConfig(...)``), or a recipe (``"svdquant"``: per-step with SVDQuant's
            options set in ``config`` where it leaves them at their defaults); ``"NAME+CORR"``
            adds the sampling correction ``CORR``, and a correction's name alone (``"ptqd"``)
            is per-step with it.
        calib: FP trajectories (or a path to a saved set) to calibrate on; collected
            from ``calib_samples`` seeded noises when ``None``.
        steps, scheduler: the sampler used at inference; calibration follows it.
        calib_samples, seed, labels, prompts: what the calibration trajectories start from.
        guidance_scale: classifier-free guidance scale (default: the model's).
        batch_size: samples per forward pass during calibration.
        micro_batches: passes per optimisation batch (gradient accumulation: less memory,
            the same step up to float rounding). Under ``torch.distributed`` each rank
            computes its share of every batch and the gradients are summed over the ranks
            (:mod:`accuquant.calibrate.distributed`).
        max_memory: RAM for the data a method captures from the running model (per-step's
            block inputs and outputs: ``"4GB"``, ``"512MB"``, or bytes); what does not fit
            is kept in temporary files and read back by chunks, with the same result.
        device: ``"cpu"`` or ``"cuda"``.
        inplace: quantize ``source``'s own model instead of a copy.
        use_cache: reuse calibration trajectories and results cached by earlier runs (a
            method with its default options that ran on the same model, config, data and
            seed is served from the result store).
        resume: continue an interrupted calibration with the same settings from its last
            checkpoint (under ``cache_dir()/runs``; removed when the run finishes).
        correct: a sampling correction (``"ptqd"``: :mod:`accuquant.methods.corrections`),
            estimated on the calibration trajectories once calibrated, saved with the model
            and applied in every sampler step.

    Returns:
        the quantized :class:`Pipeline` (weights frozen as integer codes; ``pipe.quant``
        says what was done).
    """
    config = config if config is not None else QuantConfig()
    if isinstance(method, str):
        method, correct = split_method(method, correct)
    else:
        correct = split_method(method.NAME, correct)[1]  # an unknown correction is refused here
    recipe = method if isinstance(method, str) and method in RECIPES else None
    method, config = resolve_recipe(method, config)
    mconfig = method_config(method, method_options)
    prep = prepare(source, config, mconfig, calib, steps=steps, scheduler=scheduler, calib_samples=calib_samples,
                   seed=seed, guidance_scale=guidance_scale, labels=labels, prompts=prompts, batch_size=batch_size,
                   micro_batches=micro_batches, max_memory=max_memory, device=device, progress=progress,
                   inplace=inplace, use_cache=use_cache, resume=resume)
    run, t1 = prep.run, time.perf_counter()
    run.log.update(cached_or_calibrate(run, mconfig, reuse=mconfig.is_default()))
    if recipe:
        run.log["recipe"] = recipe
    if is_main() and run.checkpoint is not None:
        run.checkpoint.unlink(missing_ok=True)
    record = QuantRecord(
        config=prep.config, report=prep.report, method=mconfig.NAME, method_version=mconfig.VERSION,
        method_config=mconfig.to_dict(), method_options=method_options,
        calibration={"samples": run.calib.num_samples, "seed": run.calib.meta.get("seed"), "solver": run.solver.name,
                     "steps": steps, "guidance_scale": run.denoiser.guidance_scale},
        method_log=run.log, timing_s={"calibration_data": round(prep.seconds, 3),
                                      "method": round(time.perf_counter() - t1, 3)},
        accuquant_version=__version__, dtype=str(prep.dtype).removeprefix("torch."))
    if correct is not None:  # before freezing: the FP model is still at hand, with the quantizers off
        t2 = time.perf_counter()

        def reference(x, t, cond):
            with quantization_disabled(run.model):
                return run.denoiser(x, t, cond)

        record.correction = CORRECTIONS[correct].estimate(run.denoiser, run.solver, run.calib, run.batch_size,
                                                          run.device, run.progress, reference).to_dict()
        record.timing_s["correction"] = round(time.perf_counter() - t2, 3)
    return freeze(prep, record)
