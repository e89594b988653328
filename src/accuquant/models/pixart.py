"""PixArt-Σ (``PixArtTransformer2DModel``): a DiT with cross-attention to T5 embeddings and
one adaLN-single timestep modulation shared by every block."""

from __future__ import annotations

import torch

from .base import Conditions, TextConditional, register_adapter


@register_adapter("PixArtTransformer2DModel")
class PixArtAdapter(TextConditional):
    """Text-conditioned through the T5 sequence (``cond["embeds"]``) and its attention mask
    (``cond["mask"]``, the padding tokens masked out of cross-attention), encoded by diffusers'
    own ``PixArtSigmaPipeline`` code without caption cleaning (``clean_caption=False``); the
    unconditional branch is the empty prompt, the pipeline's default negative prompt. A
    learned-variance output keeps only its first half (the noise), as the pipeline does.

    Kept in FP: the patch embedding, the final layer, and adaLN-single (``adaln_single``: the
    timestep modulation every block and the final layer read)."""

    family = "PixArt-Σ"
    component = "transformer"
    layer_kinds = ("linear",)
    pipeline_class = "PixArtSigmaPipeline"
    condition_keys = ("embeds", "mask")
    layer_kinds = ("linear",)  # the one convolution, the patch embedding, stays in FP
    default_sample_size = 128  # PixArt-Σ 1024: 1024 x 1024 images
    block_types = ("BasicTransformerBlock", "PixArtAlphaTextProjection")
    keep_fp = ("pos_embed.proj", "proj_out", "adaln_single.*")
    temporal_layers = ("adaln_single.*",)

    def raw(self, x, t, cond):
        self.require(cond)
        out = self.model(x, encoder_hidden_states=cond["embeds"], encoder_attention_mask=cond["mask"], timestep=t,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        c = x.shape[1]
        return out[:, :c] if out.shape[1] == 2 * c else out

    def encode(self, prompts, device="cpu"):
        embeds, mask, neg, neg_mask = self.encode_prompts(prompts, device)
        return Conditions(embeds=embeds, mask=mask, negative_embeds=neg, negative_mask=neg_mask)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device="cpu"):
        """``(embeds, mask, negative_embeds, negative_mask)`` of ``prompts`` (negative: the empty
        prompt); embeddings in float32, masks as the tokenizer gives them (integers), on the CPU."""
        import diffusers

        enc, tok = self.text_components("text_encoder", "tokenizer")
        pipe = diffusers.PixArtSigmaPipeline(tokenizer=tok, text_encoder=enc.to(device), vae=self.components.get("vae"),
                                             transformer=self.model, scheduler=diffusers.DDIMScheduler())
        seq = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        embeds, mask, neg, neg_mask = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt="",
                                                         device=torch.device(device), clean_caption=False, **seq)
        return embeds.float().cpu(), mask.cpu(), neg.float().cpu(), neg_mask.cpu()
