"""Model families behind one denoiser interface (:mod:`accuquant.models.base`).

One module per family registers its adapter by diffusers class name
(:func:`register_adapter`); the adapter holds every fact of its family: how it is called
and conditioned, its solver's arguments, the layers kept in full precision, the
attention processors quantized, the blocks per-step reconstructs. Adding a family is one
module and its import below, or, outside the package, one registered adapter class.
"""

from . import unet  # noqa: F401, I001  (the families register themselves; unet first: denoiser_names() order)
from . import dit  # noqa: F401
from . import sd3  # noqa: F401
from . import flux  # noqa: F401
from . import sana  # noqa: F401
from . import wan  # noqa: F401
from . import sdxl  # noqa: F401  (after unet: SDXL's adapter is tried first for UNet2DConditionModel)
from . import pixart  # noqa: F401
from .base import (ADAPTERS, ClassConditional, Conditions, Denoiser, TextConditional, adapter_class, denoiser_names,
                   families, make_denoiser, register_adapter, unsupported)
from .unet import shortcut_splits

__all__ = ["ADAPTERS", "ClassConditional", "Conditions", "Denoiser", "TextConditional", "adapter_class",
           "denoiser_names", "families", "make_denoiser", "register_adapter", "shortcut_splits",
           "unsupported"]
