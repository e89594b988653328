"""The method registry, and methods that start from other methods' results.

The registry maps a name to a method class (:class:`~accuquant.calibrate.protocol.Method`
with its ``Config``); :mod:`accuquant.methods` imports the built-in methods, which
register themselves with :func:`register_method`. A method's result is kept in the
result store (:mod:`accuquant.cache`) under the run's model, config, data and seed, so a
method that starts from another (:func:`start_from`) reuses it.
"""

from __future__ import annotations

import dataclasses
import time

from .. import cache
from ..calibrate.distributed import is_main
from ..calibrate.loop import calibrate
from ..calibrate.protocol import Run
from ..config import MethodConfig
from ..errors import AccuQuantError
from .corrections import split_method

#: name -> method class (with a ``Config`` attribute)
METHODS: dict[str, type] = {}

#: recipes: a method with the quantization options of a published method, so that tables
#: read naturally. ``svdquant``: SVDQuant's outlier handling (smoothing, a floating-point
#: branch of rank 32 from the SVD of the smoothed weight, the residual in groups of 64) with
#: per-token activations, calibrated per step, no trajectory (docs: its faithfulness)
RECIPES: dict[str, tuple[str, dict]] = {
    "svdquant": ("per-step", {"weight_group": 64, "act_granularity": "token", "outliers": ("smooth", "lowrank"),
                              "rank": 32}),
}


def base_method(name: str) -> str:
    """The method a recipe runs (a method's name is its own; of ``NAME+CORRECTION`` or a
    correction's shorthand, the calibration method's)."""
    name = split_method(name)[0]
    return RECIPES[name][0] if name in RECIPES else name


def resolve_recipe(method, config):
    """``(method, config)``, a recipe's name replaced by its method and its options set in
    ``config`` (a :class:`~accuquant.config.QuantConfig`) wherever ``config`` leaves them at
    their defaults; anything else as it is."""
    if isinstance(method, str):
        method = split_method(method)[0]
    if not isinstance(method, str) or method not in RECIPES:
        return method, config
    from ..config import QuantConfig

    base, opts = RECIPES[method]
    default = QuantConfig()
    return base, dataclasses.replace(config, **{k: v for k, v in opts.items()
                                                if getattr(config, k) == getattr(default, k)})


def register_method(cls):
    """Class decorator: register a method under its config's ``NAME``."""
    METHODS[cls.Config.NAME] = cls
    return cls


def method_class(name: str):
    """The class of method ``name`` (a recipe's: its method's)."""
    name = base_method(name)
    if name not in METHODS:
        raise AccuQuantError(f"unknown method {name!r}; choose one of: {', '.join(sorted([*METHODS, *RECIPES]))}")
    return METHODS[name]


def config_class(name: str) -> type[MethodConfig]:
    return method_class(name).Config


def method_config(method, options: dict | None = None) -> MethodConfig:
    """A validated config from a method name and keyword options, or a config given as it is."""
    if isinstance(method, MethodConfig):
        if options:
            raise AccuQuantError("pass method options either in the config or as keywords, not both")
        return method
    return config_class(method).from_options(options or {})


def cached_or_calibrate(run: Run, config: MethodConfig, reuse: bool = True) -> dict:
    """Set the quantizers to ``config``'s result: from the result store when ``reuse`` and
    this model, config, data and seed have it there, else by calibrating ``run`` with the
    method (resumable from its checkpoint), then kept in the store. Returns the result's log."""
    store = cache.ResultStore(run.result_cache, run.base_key)
    log = store.load(run.model, config) if reuse else None
    if log is None:
        t0 = time.perf_counter()
        calibrate(run, method_class(config.NAME)(config))
        log = {"method": config.NAME, "seconds": round(time.perf_counter() - t0, 2), **run.log}
        if is_main():
            store.save(run.model, config, log)
    return log


def start_from(run: Run, name: str, options: dict | None = None) -> None:
    """Set the quantizers to method ``name``'s result with ``options`` (default: its
    defaults), stored or computed (:func:`cached_or_calibrate`, resumable from its own
    checkpoint beside this run's); its log becomes ``run.log["init"]``."""
    ckpt = None if run.checkpoint is None else run.checkpoint.with_name(run.checkpoint.stem + ".init.safetensors")
    run.log["init"] = cached_or_calibrate(dataclasses.replace(run, checkpoint=ckpt, log={}),
                                          method_config(name, options or {}))
    if ckpt is not None and is_main():
        ckpt.unlink(missing_ok=True)
