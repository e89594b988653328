"""A denoiser compiled by ``torch.compile`` (Inductor), on whatever backend its layers run.

Inductor fuses the float work around the kernels: rounding an input to its codes into the
op that produced the input, bias and activation epilogues, the attention's softmax. Its
CPU passes lower oneDNN's int8 linear and conv only when their prepacked weights are graph
constants, so compiling turns on Inductor's freezing (weights folded as constants: the
compiled model is for inference, and later changes to its weights are not seen). This is
a process-wide Inductor setting. Compiled graphs are cached on disk by Inductor, under
:func:`accuquant.cache.cache_dir` ``/inductor`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set, so
a second process compiles faster.
"""

from __future__ import annotations

import os

from torch import nn


def compile_model(model: nn.Module) -> nn.Module:
    """Compile ``model`` in place (``nn.Module.compile``: the module stays the same object,
    its names, state and backends unchanged); the compilation happens at its first call."""
    import torch._inductor.config as inductor

    from ..cache import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    inductor.freezing = True
    model.compile(dynamic=False)
    return model
