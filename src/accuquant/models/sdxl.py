"""Stable Diffusion XL: a ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``,
conditioned on two CLIP text encoders and on the image size (micro-conditioning)."""

from __future__ import annotations

import torch

from .base import Conditions, register_adapter
from .unet import UNet2DConditionAdapter


@register_adapter("UNet2DConditionModel")
class SDXLAdapter(UNet2DConditionAdapter):
    """Text-conditioned through the two encoders' concatenated hidden states (``cond["embeds"]``)
    and the second encoder's pooled projection (``cond["pooled"]``), encoded by diffusers' own
    ``StableDiffusionXLPipeline`` code. The size micro-conditions (``time_ids``) are built at
    each call from the latent's size, as that pipeline builds them by default: original and
    target size the image's, crop at (0, 0).

    The unconditional branch is what ``StableDiffusionXLPipeline(prompt, guidance_scale=g)``
    uses without a negative prompt: with :attr:`force_zeros_for_empty_prompt` (SDXL base, and
    the pipeline's default) zero embeddings, else the empty prompt's. Blocks, layers kept in
    FP and shortcut splits are the UNet's."""

    family = "SDXL"
    pipeline_class = "StableDiffusionXLPipeline"
    condition_keys = ("embeds", "pooled")
    default_sample_size = 128  # StableDiffusionXLPipeline's default: 1024 x 1024 images
    #: the pipeline's unconditional branch without a negative prompt: zeros (``True``) or the empty prompt
    force_zeros_for_empty_prompt = True

    @classmethod
    def matches(cls, model):
        return getattr(model.config, "addition_embed_type", None) == "text_time"

    @property
    def vae_scale_factor(self) -> int:
        vae = self.components.get("vae")
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8

    def time_ids(self, x: torch.Tensor) -> torch.Tensor:
        """``StableDiffusionXLPipeline._get_add_time_ids`` for ``x``'s image size, one row per sample:
        ``(original size, crop top-left, target size)``."""
        h, w = (s * self.vae_scale_factor for s in x.shape[-2:])
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=x.dtype, device=x.device).repeat(x.shape[0], 1)

    def raw(self, x, t, cond):
        self.require(cond)
        added = {"text_embeds": cond["pooled"], "time_ids": self.time_ids(x)}
        return self.model(x, t, encoder_hidden_states=cond["embeds"], added_cond_kwargs=added).sample

    def encode(self, prompts, device="cpu"):
        embeds, neg, pooled, neg_pooled = self.encode_prompts(prompts, device)
        return Conditions(embeds=embeds, negative_embeds=neg, pooled=pooled, negative_pooled=neg_pooled)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device="cpu"):
        """``(embeds, negative_embeds, pooled, negative_pooled)`` of ``prompts`` (negative: the
        pipeline's default without a negative prompt), in float32 on the CPU."""
        import diffusers

        enc, tok, enc2, tok2 = self.text_components("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=self.components.get("vae"), text_encoder=enc.to(device), tokenizer=tok, text_encoder_2=enc2.to(device),
            tokenizer_2=tok2, unet=self.model, scheduler=diffusers.DDIMScheduler(),
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, add_watermarker=False)
        out = pipe.encode_prompt(prompts, device=torch.device(device), do_classifier_free_guidance=True)
        return tuple(t.float().cpu() for t in out)
