"""Sana (``SanaTransformer2DModel``): a linear-attention diffusion transformer with Mix-FFN
(depthwise convolution) blocks, a Gemma 2 text encoder and the deep-compression
autoencoder (DC-AE), trained with flow matching."""

from __future__ import annotations

import torch

from ..errors import AccuQuantError
from .base import Conditions, Denoiser, TextConditional, register_adapter


@register_adapter("SanaTransformer2DModel")
class SanaAdapter(TextConditional):
    """Text-conditioned through the Gemma 2 sequence (``cond["embeds"]``) and its attention
    mask (``cond["mask"]``), which the model turns into a bias on cross-attention; the
    unconditional branch: ``negative_embeds`` and ``negative_mask`` (the empty prompt).
    Prompts are encoded by diffusers' own ``SanaPipeline`` code without its complex human
    instruction (``complex_human_instruction=None`` in a diffusers call): the embeddings of
    the prompt as given. Timesteps are scaled by the config's ``timestep_scale``, as the
    pipeline does; a learned-variance output keeps its first half.

    Self-attention is linear (ReLU kernels, ``SanaLinearAttnProcessor2_0``), cross-attention
    a softmax over the text (``SanaAttnProcessor2_0``): both are quantized. The Mix-FFN's
    depthwise convolution is a grouped ``Conv2d``, quantized like any other layer. The model
    predicts the flow velocity: its DPM-Solver config in flow mode samples with ``flow-euler``.
    A guidance-distilled model (``guidance_embeds``: Sana Sprint, another pipeline) is refused."""

    family = "Sana"
    component = "transformer"
    default_solver = "flow-euler"
    pipeline_class = "SanaPipeline"
    condition_keys = ("embeds", "mask")
    block_types = ("SanaTransformerBlock", "AdaLayerNormSingle", "PixArtAlphaTextProjection")
    keep_fp = ("patch_embed.proj", "proj_out")  # patch embedding and final layer, as DiT
    temporal_layers = ("time_embed.*",)
    attention_processors = Denoiser.attention_processors + (
        "SanaLinearAttnProcessor2_0", "QuantSanaLinearAttnProcessor", "SanaAttnProcessor2_0", "QuantSanaAttnProcessor")

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        if getattr(model.config, "guidance_embeds", False):
            raise AccuQuantError("SanaTransformer2DModel with guidance_embeds (Sana Sprint) is not supported: "
                                 "SanaPipeline's models have no guidance embedding")

    def raw(self, x, t, cond):
        self.require(cond)
        out = self.model(x, encoder_hidden_states=cond["embeds"], encoder_attention_mask=cond["mask"],
                         timestep=t * self.config.timestep_scale).sample
        c = x.shape[1]
        return out[:, :c] if out.shape[1] == 2 * c else out

    @property
    def image_shape(self):
        c, h, w = self.sample_shape
        vae = self.components.get("vae")
        if vae is None:
            return (c, h, w)
        f = 2 ** (len(vae.config.decoder_block_out_channels) - 1)  # DC-AE: one factor 2 per level
        return (vae.config.in_channels, h * f, w * f)

    @torch.no_grad()
    def decode(self, x):
        """As ``SanaPipeline``: latents divided by the DC-AE's scaling factor (it has no shift)."""
        vae = self.components.get("vae")
        if vae is not None:
            x = vae.decode((x / vae.config.scaling_factor).to(vae.dtype)).sample
        return ((x.float().clamp(-1, 1) + 1) / 2).cpu()

    def encode(self, prompts, device="cpu"):
        embeds, mask, neg, neg_mask = self.encode_prompts(prompts, device)
        return Conditions(embeds=embeds, mask=mask, negative_embeds=neg, negative_mask=neg_mask)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device="cpu"):
        """``(embeds, mask, negative_embeds, negative_mask)`` of ``prompts`` (negative: the
        empty prompt), embeddings in float32, all on the CPU."""
        import diffusers

        c = self.components
        missing = [k for k in ("text_encoder", "tokenizer") if c.get(k) is None]
        if missing:
            raise AccuQuantError(f"prompts given, but the pipeline has no {', '.join(missing)}")
        pipe = diffusers.SanaPipeline(tokenizer=c["tokenizer"], text_encoder=c["text_encoder"].to(device),
                                      vae=c.get("vae"), transformer=self.model,
                                      scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
        seq = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        embeds, mask, neg, neg_mask = pipe.encode_prompt(prompts, True, negative_prompt="", device=torch.device(device),
                                                         complex_human_instruction=None, **seq)
        return embeds.float().cpu(), mask.cpu(), neg.float().cpu(), neg_mask.cpu()
