"""UNets: ``UNet2DModel`` (unconditional or class-conditional, pixel or latent space) and
``UNet2DConditionModel`` (text-to-image, Stable Diffusion style)."""

from __future__ import annotations

import torch
from torch import nn

from .base import (
    ClassConditional,
    Conditions,
    Denoiser,
    TextConditional,
    register_adapter,
)

BLOCKS = ("ResnetBlock2D", "ResnetBlockCondNorm2D", "Attention", "BasicTransformerBlock", "Downsample2D",
          "Upsample2D", "TimestepEmbedding")


def shortcut_splits(model: nn.Module) -> dict[str, int]:
    """Input split channel of every UNet up-block resnet shortcut whose input is ``cat([h, skip])``.

    The up block concatenates its running features ``h`` (channels known from the block
    before it) with a skip connection; the resnet's ``conv_shortcut`` sees that
    concatenation, so its two parts get their own ranges.
    """
    splits: dict[str, int] = {}
    up_blocks = getattr(model, "up_blocks", None)
    mid = getattr(model, "mid_block", None)
    if up_blocks is None:
        return splits
    prev = mid.resnets[-1].out_channels if mid is not None and hasattr(mid, "resnets") else None
    for b, block in enumerate(up_blocks):
        resnets = getattr(block, "resnets", None)
        if not resnets:
            continue
        if prev is None:
            prev = resnets[0].in_channels  # no mid block: best effort
        h = prev
        for i, res in enumerate(resnets):
            if getattr(res, "conv_shortcut", None) is not None and res.in_channels > h:
                splits[f"up_blocks.{b}.resnets.{i}.conv_shortcut"] = h
            h = res.out_channels
        prev = h
    return splits


class _UNet(Denoiser):
    component = "unet"
    block_types = BLOCKS
    keep_fp = ("conv_in", "conv_out")  # few weights, and an error there hits every pixel
    temporal_layers = ("time_embedding.*", "*.time_emb_proj")

    def shortcut_splits(self):
        return shortcut_splits(self.model)


@register_adapter("UNet2DModel")
class UNet2DAdapter(ClassConditional, _UNet):
    """``UNet2DModel``: unconditional, or class-conditional through ``class_labels``."""

    family = "UNet (DDPM)"
    pipeline_class = "DDIMPipeline"

    @property
    def conditioning(self):
        return "class" if self.config.num_class_embeds is not None or self.config.class_embed_type else "none"

    @property
    def num_classes(self):
        return self._label_count(self.config.num_class_embeds)

    @property
    def diffusers_conditioning(self):
        return self.conditioning == "none"  # DDPMPipeline / DDIMPipeline pass no class labels

    def conditions(self, num, labels=None, prompts=None, device="cpu"):
        return super().conditions(num, labels, prompts, device) if self.conditioning == "class" else Conditions()

    def check_conditions(self, cond, what):
        if self.conditioning == "class":
            super().check_conditions(cond, what)

    def raw(self, x, t, cond):
        return self.model(x, t, class_labels=cond.get("labels")).sample


@register_adapter("UNet2DConditionModel")
class UNet2DConditionAdapter(TextConditional, _UNet):
    """``UNet2DConditionModel``: text-conditioned through ``encoder_hidden_states``
    (``cond["embeds"]``), the prompts encoded by the pipeline's CLIP text encoder."""

    family = "Stable Diffusion 1.x/2.x"
    pipeline_class = "StableDiffusionPipeline"

    @classmethod
    def matches(cls, model):
        return getattr(model.config, "addition_embed_type", None) != "text_time"  # that is SDXL's

    def raw(self, x, t, cond):
        self.require(cond)
        return self.model(x, t, encoder_hidden_states=cond["embeds"]).sample

    def encode(self, prompts, device="cpu"):
        return Conditions(embeds=self.encode_prompts(prompts, device),
                          negative_embeds=self.encode_prompts([""] * len(prompts), device))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device="cpu") -> torch.Tensor:
        tok, enc = self.text_components("tokenizer", "text_encoder")
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return enc.to(device)(ids.input_ids.to(device))[0].float().cpu()  # conditions are kept in float32
