"""The quantized attention processors of FLUX, Sana and Wan, and the map from diffusers'
processor class names to the quantized processor that computes the same.

Each computes what its diffusers processor computes, through :meth:`QuantAttnProcessor.attend`
(or, for Sana's linear attention, with its own quantized matmuls), so that the matmuls'
inputs are fake-quantized where they are read.
"""

from __future__ import annotations

import torch

from ..errors import AccuQuantError
from .attention import QuantAttnProcessor, QuantJointAttnProcessor, _quant


class QuantFluxAttnProcessor(QuantAttnProcessor):
    """FLUX's attention (``FluxAttnProcessor``): in double-stream blocks the text and image
    streams are projected by their own layers and joined text first; rotary position
    embeddings turn Q and K, which are quantized after that (what the matmul reads). A
    single-stream block's attention has no output projection (its block applies one)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 *args, **kwargs):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(t):
            return t.unflatten(-1, (-1, attn.head_dim))

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        query, key = attn.norm_q(query), attn.norm_k(key)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            cq, ck, cv = (heads(p(encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            query = torch.cat([attn.norm_added_q(cq), query], dim=1)
            key = torch.cat([attn.norm_added_k(ck), key], dim=1)
            value = torch.cat([cv, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        mask = attention_mask
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, float("-inf"))
        out = self.attend(attn, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask,
                          query.shape[-1] ** -0.5)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        n_txt = encoder_hidden_states.shape[1]
        encoder_hidden_states, out = out[:, :n_txt], out[:, n_txt:]
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(encoder_hidden_states.contiguous())


class QuantSanaAttnProcessor(QuantAttnProcessor):
    """Sana's cross-attention (``SanaAttnProcessor2_0``): as :class:`QuantAttnProcessor`, but
    Q and K are normalised (``qk_norm``) before the heads are split, and the text mask is a
    bias per head, as that processor hands it to ``scaled_dot_product_attention``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        # scaled_dot_product_attention's default scale, which the diffusers processor uses
        out = self.attend(attn, query, key, value, attention_mask, head_dim ** -0.5)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


class QuantSanaLinearAttnProcessor(QuantAttnProcessor):
    """Sana's linear self-attention (``SanaLinearAttnProcessor2_0``): ``(V' K) Q`` per head,
    with Q and K through a ReLU instead of a softmax, and V' = V with a row of ones appended,
    whose row of the product is each query's normaliser. Q, K and V are quantized where the
    matmuls read them: after the ReLU and the float32 upcast; the row of ones stays exact
    (a constant). The rest is the diffusers processor's arithmetic. There is no softmax: the
    probabilities' bits are unused."""

    def __init__(self, attn_bits: int | None, softmax_bits: int | None = None, symmetric: bool = False):
        super().__init__(attn_bits, None, symmetric)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        import torch.nn.functional as F

        dtype = hidden_states.dtype
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = query.transpose(1, 2).unflatten(1, (attn.heads, -1))  # (batch, heads, head_dim, tokens)
        key = key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)  # (batch, heads, tokens, head_dim)
        value = value.transpose(1, 2).unflatten(1, (attn.heads, -1))
        query, key, value = F.relu(query).float(), F.relu(key).float(), value.float()
        query, key, value = _quant(self.q_quant, query), _quant(self.k_quant, key), _quant(self.v_quant, value)
        value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)
        out = torch.matmul(torch.matmul(value, key), query)
        out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
        out = out.flatten(1, 2).transpose(1, 2).to(dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out.clip(-65504, 65504) if dtype == torch.float16 else out


def _wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding of ``x`` (batch, tokens, heads, head_dim), as ``WanAttnProcessor`` applies it."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class QuantWanAttnProcessor(QuantAttnProcessor):
    """Wan's attention (``WanAttnProcessor``): Q and K normalised across all heads (RMS norm
    over the projection), then split into heads; in self-attention, rotary position
    embeddings over frames, rows and columns turn Q and K, which are quantized after that
    (what the matmul reads). Cross-attention reads the text tokens, unmasked. The image
    key/value of image-to-video models (``add_k_proj``) is refused."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 *args, **kwargs):
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if getattr(attn, "add_k_proj", None) is not None:
            raise AccuQuantError("Wan image-to-video attention (an image key/value, add_k_proj) is not supported: "
                                 "text-to-video only")
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rotary(query, *rotary_emb), _wan_rotary(key, *rotary_emb)
        mask = attention_mask
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, float("-inf"))
        # scaled_dot_product_attention's default scale, which the diffusers processor uses
        out = self.attend(attn, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask,
                          query.shape[-1] ** -0.5)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


#: diffusers processor class name -> the quantized processor that computes the same
QUANT_PROCESSORS = {
    "AttnProcessor": QuantAttnProcessor,
    "AttnProcessor2_0": QuantAttnProcessor,
    "QuantAttnProcessor": QuantAttnProcessor,
    "JointAttnProcessor2_0": QuantJointAttnProcessor,
    "QuantJointAttnProcessor": QuantJointAttnProcessor,
    "FluxAttnProcessor": QuantFluxAttnProcessor,
    "QuantFluxAttnProcessor": QuantFluxAttnProcessor,
    "SanaAttnProcessor2_0": QuantSanaAttnProcessor,
    "QuantSanaAttnProcessor": QuantSanaAttnProcessor,
    "SanaLinearAttnProcessor2_0": QuantSanaLinearAttnProcessor,
    "QuantSanaLinearAttnProcessor": QuantSanaLinearAttnProcessor,
    "WanAttnProcessor": QuantWanAttnProcessor,
    "QuantWanAttnProcessor": QuantWanAttnProcessor,
}
