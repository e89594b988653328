"""Wan 2.1 text-to-video (``WanTransformer3DModel``): a diffusion transformer over
video latents (frames, rows, columns) with 3-D rotary position embeddings, a UMT5 text
encoder and a causal 3-D VAE, trained with flow matching."""

from __future__ import annotations

import torch

from ..errors import AccuQuantError
from .base import Conditions, Denoiser, TextConditional, register_adapter

#: WanPipeline's default video: 81 frames of 480 x 832 pixels
FRAMES, HEIGHT, WIDTH = 81, 480, 832


@register_adapter("WanTransformer3DModel")
class WanAdapter(TextConditional):
    """Text-conditioned through the UMT5 sequence (``cond["embeds"]``, zero-padded beyond
    each prompt's tokens, unmasked), encoded by diffusers' own ``WanPipeline`` code (512
    tokens unless ``max_sequence_length`` says); the unconditional branch:
    ``negative_embeds`` (the empty prompt), as ``WanPipeline``'s default negative prompt.

    Samples are video latents ``C, F, H, W``: ``num_frames`` latent frames (default: those of
    ``WanPipeline``'s 81 frames, 21 with the temporal factor 4) of ``sample_size`` (default:
    its 480 x 832 pixels over the VAE's spatial factor, 60 x 104). They decode, as the
    pipeline does, through the latents' mean and deviation and the 3-D VAE, to frames
    ``(B, 3, frames, height, width)`` in [0, 1]: a video model's samples are not images,
    and what makes or scores images refuses it.

    Attention (``WanAttnProcessor``: rotary self-attention, text cross-attention) is
    quantized. The patch embedding is a ``Conv3d`` (not wrapped: it stays in full
    precision) and the final projection is kept in full precision. Image-to-video models
    (an image embedding, ``image_dim``) and two-stage Wan 2.2 pipelines (``transformer_2``)
    are refused."""

    family = "Wan 2.1"
    media = "video"
    component = "transformer"
    layer_kinds = ("linear",)
    default_solver = "flow-euler"
    pipeline_class = "WanPipeline"
    condition_keys = ("embeds",)
    block_types = ("WanTransformerBlock", "WanTimeTextImageEmbedding")
    keep_fp = ("patch_embedding", "proj_out")  # patch embedding (a Conv3d, never wrapped) and final layer
    temporal_layers = ("condition_embedder.time_embedder.*", "condition_embedder.time_proj")
    attention_processors = Denoiser.attention_processors + ("WanAttnProcessor", "QuantWanAttnProcessor")

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        if getattr(model.config, "image_dim", None) or getattr(model.config, "added_kv_proj_dim", None):
            raise AccuQuantError("WanTransformer3DModel with an image embedding (image-to-video) is not supported: "
                                 "Wan 2.1 text-to-video only")
        if self.components.get("transformer_2") is not None:
            raise AccuQuantError("a two-stage Wan pipeline (transformer_2, Wan 2.2) is not supported: "
                                 "Wan 2.1 text-to-video only")

    def _vae_factor(self, key: str, default: int) -> int:
        vae = self.components.get("vae")
        return (getattr(vae.config, key, None) if vae is not None else None) or default

    @property
    def latent_size(self):
        if self._sample_size is not None:
            return super().latent_size
        s = self._vae_factor("scale_factor_spatial", 8)
        return (HEIGHT // s, WIDTH // s)

    @property
    def num_frames(self) -> int:
        """Latent frames: as given, else those of ``WanPipeline``'s default video."""
        if self._num_frames is not None:
            return self._num_frames
        return (FRAMES - 1) // self._vae_factor("scale_factor_temporal", 4) + 1

    @property
    def sample_shape(self):
        (h, w), f = self.latent_size, self.num_frames
        p_t, p_h, p_w = self.config.patch_size
        if f < 1 or f % p_t or h % p_h or w % p_w:
            raise AccuQuantError(f"Wan latents are cut in {p_t}x{p_h}x{p_w} patches: {f} frames of {h}x{w} do not "
                                 "divide into them")
        return (self.config.in_channels, f, h, w)

    @property
    def image_shape(self):
        raise AccuQuantError(f"{type(self.model).__name__} ({self.family}) is a video model: its samples are "
                             "videos, not images")

    def raw(self, x, t, cond):
        self.require(cond)
        return self.model(hidden_states=x, timestep=t, encoder_hidden_states=cond["embeds"]).sample

    @torch.no_grad()
    def decode(self, x):
        """Frames ``(B, 3, F, H, W)`` in [0, 1], as ``WanPipeline`` decodes its latents."""
        vae = self.components.get("vae")
        if vae is not None:
            z = vae.config.z_dim
            x = x.to(vae.dtype)
            mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(x.device, x.dtype)
            inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(x.device, x.dtype)
            x = vae.decode(x / inv_std + mean).sample
        return ((x.float().clamp(-1, 1) + 1) / 2).cpu()

    def encode(self, prompts, device="cpu"):
        return Conditions(embeds=self.encode_prompts(prompts, device),
                          negative_embeds=self.encode_prompts([""] * len(prompts), device))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device="cpu") -> torch.Tensor:
        """The UMT5 embeddings of ``prompts``, in float32 on the CPU."""
        import diffusers

        c = self.components
        missing = [k for k in ("text_encoder", "tokenizer") if c.get(k) is None]
        if missing:
            raise AccuQuantError(f"prompts given, but the pipeline has no {', '.join(missing)}")
        pipe = diffusers.WanPipeline(tokenizer=c["tokenizer"], text_encoder=c["text_encoder"].to(device),
                                     vae=c.get("vae"), transformer=self.model,
                                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
        embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=torch.device(device),
                                       max_sequence_length=self.max_sequence_length or 512)
        return embeds.float().cpu()
