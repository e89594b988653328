"""The one entry point: ``quantize(source, config, method=..., calib=...)``.

1. load or copy the full-precision pipeline;
2. collect (or reuse) FP calibration trajectories with the inference solver;
3. wrap the denoiser's layers and attention processors;
4. run the method (every method starts from the naive ranges);
5. freeze: weights become integer codes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from . import __version__
from .adapters import Conditions, shortcut_splits
from .calibration import Trajectories, collect_trajectories, settings_key
from .config import QuantConfig
from .errors import AccuQuantError
from .layers import freeze_model, wrap_model
from .methods import CalibrationContext, check_method_options, get_method, key_version, save_result
from .pipeline import Pipeline, as_pipeline
from .safety import check_device, check_finite
from .sampling import make_solver


def cache_dir() -> Path:
    """Where calibration trajectories are cached: ``$ACCUQUANT_CACHE`` or ``~/.cache/accuquant``."""
    root = os.environ.get("ACCUQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "accuquant"
    )
    return Path(root)


def calibration_data(
    pipe: Pipeline,
    solver,
    num: int,
    seed: int,
    guidance_scale: float | None,
    cond: Conditions,
    batch_size: int,
    device,
    progress: bool,
    use_cache: bool = True,
) -> Trajectories:
    """FP trajectories for calibration, from the cache when the same set was collected before."""
    den = pipe.denoiser(guidance_scale)
    key = settings_key(pipe.fingerprint(), solver.describe(), num, seed, den.guidance_scale, cond)
    path = cache_dir() / "calib" / f"{key}.safetensors"
    if use_cache and path.is_file():
        try:
            return Trajectories.load(path)
        except AccuQuantError:
            path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt
    traj = collect_trajectories(den, solver, num, seed, cond, batch_size, device, progress)
    if use_cache:
        traj.save(path)
    return traj


def run_key(fingerprint: str, config: QuantConfig, method: str, options: dict, calib: Trajectories, seed: int,
            batch_size: int, guidance_scale: float) -> str:
    """A hash of everything a calibration run's result depends on (names its checkpoint)."""
    h = hashlib.sha256(fingerprint.encode())
    what = {"config": config.to_dict(), "method": method, "options": options, "seed": seed,
            "batch_size": batch_size, "g": guidance_scale}
    if key_version(method) is not None:
        what["version"] = key_version(method)
    h.update(json.dumps(what, sort_keys=True, default=str).encode())
    for t in (calib.xs, calib.outs, calib.timesteps, *(v for _, v in calib.cond.items())):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def quantize(
    source,
    config: QuantConfig | None = None,
    method: str = "naive",
    calib: Trajectories | str | Path | None = None,
    *,
    steps: int = 20,
    scheduler: str = "ddim",
    calib_samples: int = 64,
    seed: int = 0,
    guidance_scale: float | None = None,
    labels=None,
    prompts: list[str] | None = None,
    batch_size: int = 32,
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
        method: calibration method name (``"naive"``, ...).
        calib: FP trajectories (or a path to a saved set) to calibrate on; collected
            from ``calib_samples`` seeded noises when ``None``.
        steps, scheduler: the sampler used at inference; calibration follows it.
        calib_samples, seed, labels, prompts: what the calibration trajectories start from.
        guidance_scale: classifier-free guidance scale (default: the model's).
        batch_size: samples per forward pass during calibration.
        device: ``"cpu"`` or ``"cuda"``.
        inplace: quantize ``source``'s own model instead of a copy.
        use_cache: reuse calibration trajectories cached from an earlier run.
        resume: continue an interrupted calibration with the same settings from its last
            checkpoint (methods that learn save one after each unit of work, under
            ``cache_dir()/runs``; it is removed when the run finishes).
        method_options: passed to the method (e.g. ``iters=``, ``lr=``; see the method's module).

    Returns:
        the quantized :class:`Pipeline` (weights frozen as integer codes).
    """
    config = config if config is not None else QuantConfig()
    calibrate = get_method(method)
    check_method_options(method, method_options)
    check_device(device)
    pipe = as_pipeline(source, copy_model=not inplace)
    if pipe.quant is not None:
        raise AccuQuantError("the model is already quantized")
    check_finite(pipe.model, type(pipe.model).__name__)
    dtypes = {t.dtype for t in pipe.model.parameters()}
    if dtypes != {torch.float32}:
        raise AccuQuantError(f"the denoiser is {', '.join(sorted(map(str, dtypes)))}: quantize an fp32 model "
                             "(load it without torch_dtype)")
    pipe.to(device)
    solver = make_solver(scheduler, pipe.scheduler_config, steps)
    den = pipe.denoiser(guidance_scale)
    t0 = time.perf_counter()
    if calib is None:
        cond = pipe.conditions(calib_samples, labels, prompts, device="cpu")
        calib = calibration_data(pipe, solver, calib_samples, seed, guidance_scale, cond, batch_size, device, progress, use_cache)
    elif not isinstance(calib, Trajectories):
        calib = Trajectories.load(calib)
    if calib.num_steps != solver.num_steps or not torch.equal(calib.timesteps, solver.timesteps.cpu()):
        raise AccuQuantError(
            f"calibration data: its {calib.num_steps} steps do not match the {scheduler} solver's {solver.num_steps}"
        )
    if tuple(calib.xs.shape[2:]) != den.sample_shape:
        raise AccuQuantError(f"calibration data: samples of shape {tuple(calib.xs.shape[2:])} do not fit this model "
                             f"({den.sample_shape})")
    if den.conditioning == "class" and calib.cond.labels is None:
        raise AccuQuantError("calibration data: this model is class-conditional, but the data has no labels")
    splits = shortcut_splits(pipe.model)
    report = wrap_model(pipe.model, config, splits)
    pipe.to(device)
    key = run_key(pipe.fingerprint(), config, method, method_options, calib, seed, batch_size, den.guidance_scale)
    checkpoint = cache_dir() / "runs" / f"{key}.safetensors"
    base = run_key(pipe.fingerprint(), config, "", {}, calib, seed, batch_size, den.guidance_scale)
    ctx = CalibrationContext(den, solver, calib, config, batch_size, device, progress, seed, method_options,
                             checkpoint=checkpoint, resume=resume, run_key=key, base_key=base,
                             result_cache=cache_dir() / "results" if use_cache else None)
    t1 = time.perf_counter()
    calibrate(ctx)
    if not method_options:  # the default result: a later run may start from it (accuquant's init)
        save_result(ctx, method, {"method": method, "seconds": round(time.perf_counter() - t1, 2), **ctx.log})
    checkpoint.unlink(missing_ok=True)
    freeze_model(pipe.model)
    pipe.model.eval()
    pipe.quant = {
        "config": config.to_dict(),
        "splits": report.split,
        "report": report.to_dict(),
        "method": method,
        "method_options": {k: v for k, v in method_options.items() if isinstance(v, (int, float, str, bool, type(None)))},
        "calibration": {"samples": calib.num_samples, "seed": calib.meta.get("seed"), "solver": solver.name,
                        "steps": steps, "guidance_scale": den.guidance_scale},
        "method_log": ctx.log,
        "timing_s": {"calibration_data": round(t1 - t0, 3), "method": round(time.perf_counter() - t1, 3)},
        "accuquant_version": __version__,
    }
    return pipe
