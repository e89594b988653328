"""Reconstruction blocks of a wrapped denoiser, in the order the network runs them.

Block reconstruction (BRECQ, Q-Diffusion) calibrates a network one block at a time: a
diffusers ResNet block, a transformer block, an attention block, an up/down-sampler, the
time embedding MLP, or a single quantized layer where a layer stands alone. A block is
the outermost module of one of those types that holds quantizers; quantized layers
outside every such module are blocks of their own. The order is the order of first
use in a forward pass (module registration order is not execution order: diffusers
registers ``up_blocks`` before ``mid_block``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..quant.layers import QuantLayer
from ..quant.quantizers import UniformQuantizer

@dataclass
class Block:
    """One reconstruction unit: a module and its quantizers."""

    name: str
    module: nn.Module
    weight_quant: list[UniformQuantizer] = field(default_factory=list)
    act_quant: list[UniformQuantizer] = field(default_factory=list)

    @property
    def layers(self) -> list[QuantLayer]:
        return [m for m in self.module.modules() if isinstance(m, QuantLayer)]


def _quantizers(module: nn.Module) -> tuple[list[UniformQuantizer], list[UniformQuantizer]]:
    weight, seen = [], set()
    for layer in (m for m in module.modules() if isinstance(m, QuantLayer)):
        for q in layer.weight_quant:  # every part of a split layer (both halves)
            weight.append(q)
            seen.add(id(q))
    act = [m for m in module.modules() if isinstance(m, UniformQuantizer) and id(m) not in seen]
    return weight, act


def find_blocks(model: nn.Module, run_forward, block_types: tuple[str, ...]) -> list[Block]:
    """The reconstruction blocks of ``model``, in execution order.

    Args:
        model: a wrapped denoiser (its layers are :class:`QuantLayer`).
        run_forward: a callable running one forward pass of ``model`` (used to find the order).
        block_types: class names of the modules reconstructed as one block (the family's
            adapter says which).
    """
    candidates: dict[str, nn.Module] = {}
    covered: set[int] = set()
    for name, mod in model.named_modules():
        if id(mod) in covered:
            continue
        is_block = type(mod).__name__ in block_types or isinstance(mod, QuantLayer)
        if is_block and any(isinstance(m, UniformQuantizer) for m in mod.modules()):
            candidates[name] = mod
            covered.update(id(m) for m in mod.modules())
    order: list[str] = []
    hooks = []
    for name, mod in candidates.items():
        def pre(m, args, name=name):
            if name not in order:
                order.append(name)

        hooks.append(mod.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in hooks:
            h.remove()
    # Blocks the forward never reached (unused branches) are left out: there is no data for them.
    blocks = []
    for name in order:
        w, a = _quantizers(candidates[name])
        blocks.append(Block(name, candidates[name], w, a))
    return blocks
