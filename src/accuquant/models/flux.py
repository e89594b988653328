"""FLUX.1 (``FluxTransformer2DModel``): double-stream then single-stream transformer
blocks with rotary position embeddings, trained with flow matching on packed latents."""

from __future__ import annotations

import torch

from ..errors import AccuQuantError
from .base import Conditions, Denoiser, TextConditional, register_adapter


@register_adapter("FluxTransformer2DModel")
class FluxAdapter(TextConditional):
    """Text-conditioned through the T5 sequence (``cond["embeds"]``) and CLIP's pooled
    embedding (``cond["pooled"]``), encoded by diffusers' own ``FluxPipeline`` code.

    The solver sees latents as images (``C, H, W``); the adapter packs them into FLUX's
    2x2 patch tokens and builds the rotary position ids, as ``FluxPipeline`` does, so the
    same noise gives diffusers' samples. A guidance-distilled model (``guidance_embeds``,
    FLUX.1-dev) takes the guidance scale through its embedding, in one evaluation, as
    ``FluxPipeline``'s ``guidance_scale``; otherwise (FLUX.1-schnell, ``mnist-flux``) the
    scale is true classifier-free guidance against the empty prompt (``FluxPipeline``'s
    ``true_cfg_scale`` with ``negative_prompt=""``). The sigmas shift with the image size
    (``mu``, :meth:`solver_options`)."""

    family = "FLUX.1"
    component = "transformer"
    layer_kinds = ("linear",)
    default_solver = "flow-euler"
    pipeline_class = "FluxPipeline"
    condition_keys = ("embeds", "pooled")
    default_sample_size = 128  # FluxPipeline's default: 1024 x 1024 images
    block_types = ("FluxTransformerBlock", "FluxSingleTransformerBlock", "TimestepEmbedding",
                   "PixArtAlphaTextProjection")
    keep_fp = ("x_embedder", "norm_out.linear", "proj_out")  # patch embedding and final layer, as DiT and SD3
    temporal_layers = ("time_text_embed.*", "*.norm1.linear", "*.norm1_context.linear", "*.norm.linear",
                       "norm_out.linear")
    attention_processors = Denoiser.attention_processors + ("FluxAttnProcessor", "QuantFluxAttnProcessor")

    @property
    def distilled(self) -> bool:
        """Guidance-distilled: the scale goes in through the guidance embedding."""
        return bool(getattr(self.config, "guidance_embeds", False))

    @property
    def guided(self) -> bool:
        return not self.distilled and self.guidance_scale != 1.0

    @property
    def sample_shape(self):
        h, w = self.latent_size
        if h % 2 or w % 2:
            raise AccuQuantError(f"FLUX latents are packed in 2x2 patches: the latent size {h}x{w} must be even")
        return (self.config.in_channels // 4, h, w)

    def raw(self, x, t, cond):
        from diffusers import FluxPipeline

        self.require(cond)
        b, c, h, w = x.shape
        packed = FluxPipeline._pack_latents(x, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        embeds = cond["embeds"]
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = torch.full((b,), self.guidance_scale, device=x.device, dtype=torch.float32) if self.distilled else None
        out = self.model(hidden_states=packed, timestep=t.to(x.dtype) / 1000, guidance=guidance,
                         pooled_projections=cond["pooled"], encoder_hidden_states=embeds, txt_ids=txt_ids,
                         img_ids=img_ids).sample
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def solver_options(self, solver, scheduler_config, steps):
        """As ``FluxPipeline``: sigmas evenly spaced from 1 to ``1 / steps`` before the shift,
        and with dynamic shifting its ``mu`` from the image's token count."""
        if solver != "flow-euler":
            return {}
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        opts = {"sigmas": [1.0 - k * (1.0 - 1.0 / steps) / max(1, steps - 1) for k in range(steps)]}
        if scheduler_config.get("use_dynamic_shifting"):
            h, w = self.latent_size
            g = scheduler_config.get
            opts["mu"] = calculate_shift((h // 2) * (w // 2), g("base_image_seq_len", 256),
                                         g("max_image_seq_len", 4096), g("base_shift", 0.5), g("max_shift", 1.15))
        return opts

    def encode(self, prompts, device="cpu"):
        embeds, pooled = self.encode_prompts(prompts, device)
        neg, neg_pooled = self.encode_prompts([""] * len(prompts), device)
        return Conditions(embeds=embeds, negative_embeds=neg, pooled=pooled, negative_pooled=neg_pooled)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device="cpu"):
        """``(embeds, pooled)`` of ``prompts``, in float32 on the CPU."""
        import diffusers

        c = self.components
        self.text_components("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        pipe = diffusers.FluxPipeline(transformer=self.model, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                      vae=c.get("vae"), text_encoder=c["text_encoder"].to(device),
                                      tokenizer=c["tokenizer"], text_encoder_2=c["text_encoder_2"].to(device),
                                      tokenizer_2=c["tokenizer_2"])
        seq = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=torch.device(device), **seq)
        return embeds.float().cpu(), pooled.float().cpu()
