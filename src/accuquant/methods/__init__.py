"""Calibration methods: ``naive``, ``per-step``, ``accuquant``, ``tfmq`` and ``eda-dm``, recipes (``svdquant``:
a method with a published method's quantization options), and sampling corrections
(``ptqd``: :mod:`.corrections`) that compose with any of them.

Each is a module with its config dataclass and a
:class:`~accuquant.calibrate.protocol.Method` decorated with :func:`register_method`;
importing this package registers them all. The engine runs them all.
"""

from . import accuquant, eda_dm, naive, per_step, tfmq  # noqa: F401  (they register themselves)
from .corrections import CORRECTIONS, split_method
from .registry import METHODS, RECIPES, base_method, cached_or_calibrate, config_class, method_class, method_config, \
    register_method, resolve_recipe, start_from

__all__ = ["CORRECTIONS", "METHODS", "RECIPES", "base_method", "cached_or_calibrate", "config_class", "method_class",
           "method_config", "register_method", "resolve_recipe", "split_method", "start_from"]
