"""Multimodal diffusion transformers trained with flow matching: ``SD3Transformer2DModel``
(Stable Diffusion 3 and 3.5)."""

from __future__ import annotations

import torch

from .base import Conditions, Denoiser, TextConditional, register_adapter


@register_adapter("SD3Transformer2DModel")
class SD3Adapter(TextConditional):
    """Text-conditioned through the joint sequence (``cond["embeds"]``) and the pooled text
    embedding (``cond["pooled"]``); the unconditional branch: ``negative_embeds`` and
    ``negative_pooled``. Prompts are encoded by diffusers' own ``StableDiffusion3Pipeline``
    code (its CLIP encoders, and T5 where the pipeline has one), so the embeddings are the
    ones a diffusers user gets. The model predicts the flow velocity: sample with
    ``flow-euler``."""

    family = "SD3 / SD3.5"
    component = "transformer"
    layer_kinds = ("linear",)
    default_solver = "flow-euler"
    pipeline_class = "StableDiffusion3Pipeline"
    condition_keys = ("embeds", "pooled")
    block_types = ("JointTransformerBlock", "SD3SingleTransformerBlock", "TimestepEmbedding",
                   "PixArtAlphaTextProjection")
    keep_fp = ("pos_embed.proj", "norm_out.linear", "proj_out")  # patch embedding and final layer, as DiT
    temporal_layers = ("time_text_embed.*", "*.norm1.linear", "*.norm1_context.linear", "norm_out.linear")
    attention_processors = Denoiser.attention_processors + ("JointAttnProcessor2_0", "QuantJointAttnProcessor")

    def raw(self, x, t, cond):
        self.require(cond)
        return self.model(hidden_states=x, timestep=t, encoder_hidden_states=cond["embeds"],
                          pooled_projections=cond["pooled"]).sample

    def encode(self, prompts, device="cpu"):
        embeds, neg, pooled, neg_pooled = self.encode_prompts(prompts, device)
        return Conditions(embeds=embeds, negative_embeds=neg, pooled=pooled, negative_pooled=neg_pooled)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device="cpu"):
        """``(embeds, negative_embeds, pooled, negative_pooled)`` of ``prompts`` (negative: the
        empty prompt), in float32 on the CPU."""
        import diffusers

        c = self.components
        self.text_components("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=self.model, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=c.get("vae"),
            text_encoder=c["text_encoder"].to(device), tokenizer=c["tokenizer"],
            text_encoder_2=c["text_encoder_2"].to(device), tokenizer_2=c["tokenizer_2"],
            text_encoder_3=c["text_encoder_3"].to(device) if c.get("text_encoder_3") is not None else None,
            tokenizer_3=c.get("tokenizer_3"))
        seq = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        out = pipe.encode_prompt(prompts, None, None, device=torch.device(device), do_classifier_free_guidance=True,
                                 negative_prompt=[""] * len(prompts), **seq)
        return tuple(t.float().cpu() for t in out)
