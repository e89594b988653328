"""Diffusers attention processors that quantize the inputs of both attention matmuls.

They compute what diffusers' ``AttnProcessor`` (and, for MMDiTs such as Stable Diffusion 3,
``JointAttnProcessor2_0``) computes, with explicit matmuls so that their inputs can be
fake-quantized: Q and K before ``Q.K^T``, the softmax output and V before ``softmax.V``.
The projections (``to_q``, ``to_k``, ``to_v``, ``to_out``, and the text stream's
``add_*_proj``, ``to_add_out``) are ordinary linear layers, wrapped like every other layer.
Installed with ``Attention.set_processor``; no library source is touched.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..backends.base import FAKE_ARITHMETIC, fake_quant_
from .quantizers import UniformQuantizer


#: score elements above which inference computes attention by blocks of query rows (16 MB)
CHUNK = 1 << 22
#: the int8 backend's attention: keys from which softmax . V runs on the int8 kernels, and
#: the score elements of one block of one head (16 MB)
INT8_MIN_KEYS = 64
INT8_BLOCK = 1 << 22


def _maybe(bits: int | None, symmetric: bool) -> nn.Module:
    return UniformQuantizer(bits, symmetric) if bits is not None else nn.Identity()


def _frozen(q: nn.Module) -> bool:
    """``q`` quantizes on one fixed per-tensor grid (not observing, no learnable rounding)."""
    return (isinstance(q, UniformQuantizer) and q.enabled and q.observer is None and q.alpha is None
            and q.codes is None and q.scale.numel() == 1)


def _active(q: nn.Module) -> bool:
    return isinstance(q, UniformQuantizer) and q.enabled


def _probs_grid(q: UniformQuantizer) -> tuple[float, int, int, int, bool]:
    """``(s, z, lo, hi, clamp)`` of the probabilities' grid: codes ``round(p / s)`` clamped
    to ``[lo, hi] = [qmin - z, qmax - z]``, where ``clamp`` is False if every probability in
    [0, 1] already lands there (the clamp can be skipped)."""
    s, z = q.scale.item(), int(q.zero_point.item())
    lo, hi = q.qmin - z, q.qmax - z
    return s, z, lo, hi, not (lo <= 0 and hi >= math.floor(1.0 / s) + 1)


def _quant(q: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``q(x)`` for ``x``, a temporary of the processor: at inference, computed in place on
    ``x`` with the same arithmetic (:func:`~accuquant.backends.fake_quant_`); out of place
    under ``torch.compile``, where ``x`` can be a graph's input, whose in-place update
    Inductor's freezing gets wrong."""
    if _frozen(q) and not torch.is_grad_enabled() and x.dtype == q.scale.dtype and not torch.compiler.is_compiling():
        z = q.zero_point.item()
        return fake_quant_(x.div_(q.scale), q.scale.item(), q.qmin - z, q.qmax - z)
    return q(x)


class QuantAttnProcessor(nn.Module):
    """Attention with fake-quantized matmul inputs.

    ``backend`` is set by :func:`accuquant.layers.freeze_model`: on ``fake`` and ``packed``
    inference computes exactly what calibration computed; on any other backend it takes
    :meth:`_attend_fast`, equal up to float rounding (not under ``torch.compile``, which
    fuses the plain arithmetic itself).

    Args:
        attn_bits: bits of Q, K and V (``None``: floating point).
        softmax_bits: bits of the attention probabilities (``None``: floating point).
        symmetric: grid of the Q/K/V quantizers; the probabilities, in [0, 1], always use
            the unsigned grid.
    """

    def __init__(self, attn_bits: int | None, softmax_bits: int | None, symmetric: bool = False):
        super().__init__()
        self.q_quant = _maybe(attn_bits, symmetric)
        self.k_quant = _maybe(attn_bits, symmetric)
        self.v_quant = _maybe(attn_bits, symmetric)
        self.probs_quant = _maybe(softmax_bits, False)
        self.backend = "fake"

    def quantizers(self) -> dict[str, UniformQuantizer]:
        names = ("q_quant", "k_quant", "v_quant", "probs_quant")
        return {n: getattr(self, n) for n in names if isinstance(getattr(self, n), UniformQuantizer)}

    def attend(self, attn, query, key, value, attention_mask, scale: float) -> torch.Tensor:
        """``softmax(Q K^T scale + mask) V`` with quantized Q, K, V and probabilities, over the
        last two dimensions (any leading batch and head dimensions).

        At inference, a score matrix of more than ``CHUNK`` elements is computed a block of
        query rows at a time, in place: the same arithmetic per element (each output row is
        its own dot products; tested equal bit for bit), without allocating and faulting in
        gigabytes of scores (Stable Diffusion's 4096 tokens) for every attention."""
        query, key, value = _quant(self.q_quant, query), _quant(self.k_quant, key), _quant(self.v_quant, value)
        n_q, n_k = query.shape[-2], key.shape[-2]
        heads = query.numel() // (n_q * query.shape[-1])
        observing = any(q.observer is not None for q in self.quantizers().values())  # ranges see whole calls
        # under torch.compile, the plain arithmetic below, which Inductor fuses (its freezing
        # mishandles the fast path's per-call prepacked V and reused buffers)
        fast = self.backend not in FAKE_ARITHMETIC and not torch.compiler.is_compiling()
        if (fast and not torch.is_grad_enabled() and not observing and attention_mask is None
                and query.dtype == key.dtype == value.dtype == torch.float32 and query.device.type == "cpu"
                and n_q * n_k > 0 and (_frozen(self.probs_quant) or not _active(self.probs_quant))):
            return self._attend_fast(query, key, value, scale)
        if not torch.is_grad_enabled() and not observing and attention_mask is None and heads * n_q * n_k > CHUNK:
            rows = max(1, CHUNK // (heads * n_k))
            return torch.cat([self._scores_to_output(attn, query[..., c:c + rows, :], key, value, None, scale)
                              for c in range(0, n_q, rows)], dim=-2)
        return self._scores_to_output(attn, query, key, value, attention_mask, scale)

    def _attend_fast(self, query, key, value, scale: float) -> torch.Tensor:
        """Inference off the ``fake`` backend: the same scores, softmax and probability codes
        as :meth:`_scores_to_output`, by blocks of at most ``CHUNK`` scores in one reused
        buffer (no gigabytes allocated and faulted in per call), the softmax in place, and
        the codes ``round(p / s)`` multiplied by V before the step size ``s`` instead of
        after: one pass fewer and exact integers in the matmul, so the output differs from
        ``fake`` by float rounding only. The clamp is skipped where the grid holds every
        probability in [0, 1]."""
        lead, n_q, n_k = query.shape[:-2], query.shape[-2], key.shape[-2]
        q, k = query.reshape(-1, n_q, query.shape[-1]), key.reshape(-1, n_k, key.shape[-1])
        v = value.reshape(-1, n_k, value.shape[-1])
        kt = k.transpose(-1, -2)
        pq = self.probs_quant
        if self.backend == "int8" and n_k >= INT8_MIN_KEYS:
            values = self._int8_values(v)
            if values is not None:
                return self._attend_int8(q, kt, values, scale).reshape(*lead, n_q, v.shape[-1])
        out = torch.empty(q.shape[0], n_q, v.shape[-1], dtype=q.dtype)
        rows = max(1, min(n_q, CHUNK // (q.shape[0] * n_k)))
        buf = torch.empty(q.shape[0], rows, n_k, dtype=q.dtype)
        quantized = _active(pq)
        if quantized:
            s, _, lo, hi, clamp = _probs_grid(pq)
        for c in range(0, n_q, rows):
            r = min(rows, n_q - c)
            b, o = buf[:, :r], out[:, c:c + r]
            torch.bmm(q[:, c:c + r], kt, out=b).mul_(scale)
            torch.ops.aten._softmax.out(b, -1, False, out=b)
            if quantized:
                b.div_(s).round_()
                if clamp:
                    b.clamp_(lo, hi)
                torch.bmm(b, v, out=o).mul_(s)
            else:
                torch.bmm(b, v, out=o)
        return out.reshape(*lead, n_q, v.shape[-1])

    def _int8_values(self, v: torch.Tensor):
        """V prepacked for oneDNN's int8 matmul, one weight per head, or ``None`` where the
        kernels cannot take it (V or the probabilities not on 8-bit per-tensor grids, the
        probabilities' grid signed, no kernels, or, on CPUs without VNNI, V's integers beyond
        the +-64 those kernels sum without saturating). V's integers ``w = round(v / s_v)``
        span at most 256 values; their middle ``o`` is subtracted to fit int8 and added back
        through one more output channel whose weights are 1 (it sums each row's codes)."""
        from ..backends.int8 import available, vnni

        pq, vq = self.probs_quant, self.v_quant
        if not (available() and all(_frozen(g) and g.bits <= 8 for g in (pq, vq)) and pq.qmin >= 0):
            return None
        sv = vq.scale.item()
        w = torch.round(v / sv)
        if not torch.isfinite(w).all():
            return None
        lo, hi = int(w.min().item()), int(w.max().item())
        neg, pos = (128, 127) if vnni() else (64, 64)
        if hi - lo > neg + pos:
            return None
        off = (hi + lo + 1) // 2 if lo < -neg or hi > pos else 0
        w = (w - off).to(torch.int8)
        if off:
            w = torch.cat([w, torch.ones_like(w[..., :1])], dim=-1)
        packed = [torch.ops.onednn.qlinear_prepack(w[h].t().contiguous(), None) for h in range(w.shape[0])]
        scales = torch.full((w.shape[-1],), sv, dtype=torch.float32)
        return packed, scales, torch.zeros(w.shape[-1], dtype=torch.long), off, v.shape[-1]

    def _attend_int8(self, q, kt, values, scale: float) -> torch.Tensor:
        """:meth:`_attend_fast` with ``softmax . V`` on oneDNN's int8 kernels, a head and a
        block of query rows at a time: the probabilities' uint8 codes (computed as the fake
        backend does) times V's integers, summed exactly in int32 and scaled once."""
        packed, w_scales, w_zero, off, d_v = values
        s, z, lo, hi, clamp = _probs_grid(self.probs_quant)
        n_q, n_k = q.shape[-2], kt.shape[-1]
        rows = max(1, min(n_q, INT8_BLOCK // n_k))
        out = torch.empty(q.shape[0], n_q, d_v, dtype=torch.float32)
        buf = torch.empty(rows, n_k, dtype=torch.float32)
        codes = torch.empty(rows, n_k, dtype=torch.uint8)
        for h in range(q.shape[0]):
            for c in range(0, n_q, rows):
                r = min(rows, n_q - c)
                b, u = buf[:r], codes[:r]
                torch.mm(q[h, c:c + r], kt[h], out=b).mul_(scale)
                torch.ops.aten._softmax.out(b, -1, False, out=b)
                b.div_(s).round_()
                if clamp:
                    b.clamp_(lo, hi)
                if z:
                    b.add_(z)
                u.copy_(b)
                y = torch.ops.onednn.qlinear_pointwise(u, s, z, packed[h], w_scales, w_zero, None, 1.0, 0,
                                                       torch.float32, "none", [], "")
                if off:
                    torch.add(y[:, :d_v], y[:, d_v:], alpha=off, out=out[h, c:c + r])
                else:
                    out[h, c:c + r] = y
        return out

    def _scores_to_output(self, attn, query, key, value, attention_mask, scale: float) -> torch.Tensor:
        dtype = query.dtype
        if getattr(attn, "upcast_attention", False):
            query, key = query.float(), key.float()
        scores = torch.matmul(query, key.transpose(-1, -2))
        scores = scores.mul_(scale) if not torch.is_grad_enabled() else scores * scale
        if attention_mask is not None:
            scores = scores + attention_mask
        if getattr(attn, "upcast_softmax", False):
            scores = scores.float()
        probs = scores.softmax(dim=-1).to(dtype)
        probs = _quant(self.probs_quant, probs)
        return torch.matmul(probs, value)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)

        hidden_states = self.attend(attn, query, key, value, attention_mask, attn.scale)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class QuantJointAttnProcessor(QuantAttnProcessor):
    """Joint attention of MMDiT blocks (Stable Diffusion 3), as ``JointAttnProcessor2_0``:
    image and text tokens are projected by their own layers, attend together, and are split
    again. Q, K and V are quantized after the two streams are joined (one grid each, as one
    matmul reads them)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, n_img = hidden_states.shape[0], hidden_states.shape[1]

        def project(states, q, k, v, norm_q, norm_k):
            """One stream's Q, K, V as (batch, heads, tokens, head_dim), Q and K normalised."""
            query, key, value = (p(states) for p in (q, k, v))
            query, key, value = (t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)
                                 for t in (query, key, value))
            return (norm_q(query) if norm_q is not None else query, norm_k(key) if norm_k is not None else key,
                    value)

        query, key, value = project(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        if encoder_hidden_states is not None:
            cq, ck, cv = project(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                                 attn.norm_added_q, attn.norm_added_k)
            query, key, value = torch.cat([query, cq], dim=2), torch.cat([key, ck], dim=2), torch.cat([value, cv], dim=2)
        # scaled_dot_product_attention's default scale, which the diffusers processor uses
        out = self.attend(attn, query, key, value, None, query.shape[-1] ** -0.5)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        if encoder_hidden_states is not None:
            out, encoder_hidden_states = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, encoder_hidden_states) if encoder_hidden_states is not None else out
