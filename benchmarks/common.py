"""Helpers the benchmark scripts share."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def settings(args) -> dict:
    """The command's options, with the output path relative to the repository."""
    return {**vars(args), "out": os.path.relpath(args.out, ROOT)}


def parse_options(text: str) -> dict:
    """``"key=value,key=value"`` as method options: integers, floats (``3e-4``) or strings."""
    opts = {}
    for kv in filter(None, text.split(",")):
        k, v = kv.split("=")
        try:
            opts[k] = int(v)
        except ValueError:
            try:
                opts[k] = float(v)
            except ValueError:
                opts[k] = v
    return opts


def sd15_unet(sample_size: int = 64):
    """A UNet with Stable Diffusion 1.5's published configuration (860 M parameters),
    random-initialised with seed 0 (speed and memory only: the values mean nothing)."""
    import diffusers
    import torch

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()


def sd15_conditions(n: int):
    """``n`` random text embeddings of SD-1.5's shape (77 tokens of width 768), zero negatives."""
    import torch

    import accuquant as aq

    g = torch.Generator().manual_seed(n)
    return aq.Conditions(embeds=torch.randn(n, 77, 768, generator=g), negative_embeds=torch.zeros(n, 77, 768))
