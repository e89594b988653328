"""What runs a frozen layer: the registry of backends and the layer description they build
from (:mod:`.base`: ``LayerSpec``, ``fake``, ``packed``), and the integer backends that register
themselves here (:mod:`.int8`: oneDNN on the CPU; :mod:`.cuda_int8`: ``torch._int_mm``)."""

from . import cuda_int8, int8  # noqa: F401  (they register their backends)
from .base import (BACKENDS, FakeQuantLayer, Grid, LayerSpec, backends_for, build_layer, check_backend, get_backend,
                   register_backend)

__all__ = ["BACKENDS", "FakeQuantLayer", "Grid", "LayerSpec", "backends_for", "build_layer", "check_backend",
           "get_backend", "register_backend"]
