"""One denoiser interface over diffusers model families.

Samplers and calibration methods only ever call ``denoiser(x, t, cond)`` and get the
model output the scheduler expects (noise, v or sample prediction), classifier-free
guidance included. What differs between a ``UNet2DModel``, a ``UNet2DConditionModel``
and a DiT-style transformer lives in the small adapter classes below, registered by
the diffusers class name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from .errors import AccuQuantError


@dataclass
class Conditions:
    """Per-sample conditions of a batch.

    Args:
        labels: class labels, ``(B,)`` long, for class-conditional models.
        embeds: text embeddings, ``(B, L, D)``, for text-conditioned models.
        negative_embeds: the unconditional (empty or negative prompt) embeddings used by
            classifier-free guidance, same shape as ``embeds``.
    """

    labels: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    negative_embeds: torch.Tensor | None = None

    def items(self):
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def __len__(self) -> int:
        items = self.items()
        return len(items[0][1]) if items else 0

    def index(self, idx) -> "Conditions":
        return Conditions(**{k: v[idx] for k, v in self.items()})

    def to(self, device) -> "Conditions":
        return Conditions(**{k: v.to(device) for k, v in self.items()})

    def to_tensors(self, prefix: str = "cond.") -> dict[str, torch.Tensor]:
        return {prefix + k: v.contiguous() for k, v in self.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "cond.") -> "Conditions":
        names = {f.name for f in fields(cls)}
        return cls(**{k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and k[len(prefix):] in names})


class Denoiser(nn.Module):
    """Base adapter: ``forward(x, t, cond)`` returns the (guided) model output.

    Args:
        model: the diffusers model; quantization wraps its layers in place.
        guidance_scale: classifier-free guidance scale; 1 disables guidance.
        null_class: class label of the unconditional branch (class-conditional models).
    """

    def __init__(self, model: nn.Module, guidance_scale: float = 1.0, null_class: int | None = None):
        super().__init__()
        self.model = model
        self.guidance_scale = float(guidance_scale)
        self.null_class = null_class

    # Family-specific: one unguided evaluation.
    def raw(self, x: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        raise NotImplementedError

    @property
    def config(self):
        return self.model.config

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.config.in_channels, h, w)

    @property
    def conditioning(self) -> str:
        """``"none"``, ``"class"`` or ``"text"``."""
        return "none"

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def unconditional(self, cond: Conditions) -> Conditions:
        raise AccuQuantError(f"{type(self.model).__name__}: classifier-free guidance needs an unconditional branch")

    def forward(self, x: torch.Tensor, t, cond: Conditions | None = None) -> torch.Tensor:
        cond = cond if cond is not None else Conditions()
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        if not self.guided:
            return self.raw(x, t, cond)
        uncond = self.unconditional(cond)
        both = Conditions(**{k: torch.cat([getattr(uncond, k), v]) for k, v in cond.items() if k != "negative_embeds"})
        out = self.raw(torch.cat([x, x]), torch.cat([t, t]), both)
        out_u, out_c = out.chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)


class UNet2DAdapter(Denoiser):
    """``UNet2DModel``: unconditional, or class-conditional through ``class_labels``."""

    @property
    def conditioning(self) -> str:
        return "class" if self.config.num_class_embeds is not None or self.config.class_embed_type else "none"

    def raw(self, x, t, cond):
        return self.model(x, t, class_labels=cond.labels).sample

    def unconditional(self, cond):
        if self.null_class is None or cond.labels is None:
            return super().unconditional(cond)
        return Conditions(labels=torch.full_like(cond.labels, self.null_class))


class UNet2DConditionAdapter(Denoiser):
    """``UNet2DConditionModel``: text-conditioned through ``encoder_hidden_states``."""

    @property
    def conditioning(self) -> str:
        return "text"

    def raw(self, x, t, cond):
        if cond.embeds is None:
            raise AccuQuantError("this model is text-conditioned: it needs prompt embeddings")
        return self.model(x, t, encoder_hidden_states=cond.embeds).sample

    def unconditional(self, cond):
        if cond.negative_embeds is None:
            return super().unconditional(cond)
        return Conditions(embeds=cond.negative_embeds)


class DiTAdapter(Denoiser):
    """DiT-style class-conditional transformers (``DiTTransformer2DModel``, class-conditional
    ``Transformer2DModel``). A learned-variance output keeps only its first half; the
    unconditional class is the extra label embedding row (``num_embeds_ada_norm``)."""

    def __init__(self, model, guidance_scale=1.0, null_class=None):
        if null_class is None:
            null_class = getattr(model.config, "num_embeds_ada_norm", None)
        super().__init__(model, guidance_scale, null_class)

    @property
    def conditioning(self) -> str:
        return "class"

    def raw(self, x, t, cond):
        out = self.model(x, timestep=t, class_labels=cond.labels).sample
        c = x.shape[1]
        return out[:, :c] if out.shape[1] == 2 * c else out

    unconditional = UNet2DAdapter.unconditional


ADAPTERS: dict[str, type[Denoiser]] = {
    "UNet2DModel": UNet2DAdapter,
    "UNet2DConditionModel": UNet2DConditionAdapter,
    "DiTTransformer2DModel": DiTAdapter,
    "Transformer2DModel": DiTAdapter,
}


def make_denoiser(model: nn.Module, guidance_scale: float = 1.0, null_class: int | None = None) -> Denoiser:
    """Wrap a diffusers denoiser in its adapter."""
    name = type(model).__name__
    if name not in ADAPTERS:
        raise AccuQuantError(f"unsupported denoiser {name}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name](model, guidance_scale, null_class)


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
