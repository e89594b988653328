"""Model families behind one denoiser interface (:mod:`accuquant.adapters.base`).

One module per family registers its adapter by diffusers class name; adding a family
is one module here and its import below.
"""

from . import unet# noqa: I001  (the families register themselves; unet first: DENOISER_NAMES order)
from . import dit# noqa: F401
from . import sd3# noqa: F401
from .base import ADAPTERS, ClassConditional, Conditions, Denoiser, adapter_class, make_denoiser, register_adapter
from .unet import shortcut_splits

__all__ = ["ADAPTERS", "ClassConditional", "Conditions", "Denoiser", "adapter_class", "make_denoiser",
           "register_adapter", "shortcut_splits"]
