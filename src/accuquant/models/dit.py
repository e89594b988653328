"""DiT-style class-conditional transformers (``DiTTransformer2DModel``, class-conditional
``Transformer2DModel``)."""

from __future__ import annotations

from .base import ClassConditional, register_adapter


@register_adapter("DiTTransformer2DModel", "Transformer2DModel")
class DiTAdapter(ClassConditional):
    """A learned-variance output keeps only its first half; the unconditional class is the
    extra label embedding row (``num_embeds_ada_norm``)."""

    family = "DiT"
    component = "transformer"
    layer_kinds = ("linear",)
    pipeline_class = "DiTPipeline"
    block_types = ("BasicTransformerBlock", "Attention", "TimestepEmbedding")
    keep_fp = ("pos_embed.proj", "proj_out", "proj_out_1", "proj_out_2")  # patch embedding and output projections
    temporal_layers = ("*.norm1.emb.*", "*.norm1.linear")

    def __init__(self, model, guidance_scale=1.0, null_class=None, components=None, num_classes=None, **kw):
        if null_class is None:
            null_class = getattr(model.config, "num_embeds_ada_norm", None)
        super().__init__(model, guidance_scale, null_class, components, num_classes, **kw)

    @property
    def num_classes(self):
        return self._label_count(getattr(self.config, "num_embeds_ada_norm", None))

    def raw(self, x, t, cond):
        out = self.model(x, timestep=t, class_labels=cond.get("labels")).sample
        c = x.shape[1]
        return out[:, :c] if out.shape[1] == 2 * c else out
