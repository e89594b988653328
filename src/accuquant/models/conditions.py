"""The per-sample conditions of a batch, as every family's adapter fills and reads them."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class Conditions(Mapping):
    """Per-sample conditions of a batch: named tensors whose first dimension is the sample
    (``labels``, ``embeds``, ``negative_embeds``, pooled embeddings, ...), as a family's
    adapter fills and reads them. ``None`` values are left out.

    ``len()`` is the number of entries (a mapping); :attr:`batch_size` the number of samples.
    """

    def __init__(self, tensors: Mapping | None = None, **named):
        self._t = {k: v for k, v in {**dict(tensors or {}), **named}.items() if v is not None}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._t[key]

    def __iter__(self):
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    def __repr__(self) -> str:
        return f"Conditions({', '.join(f'{k}: {tuple(v.shape)}' for k, v in self._t.items())})"

    @property
    def batch_size(self) -> int:
        return len(next(iter(self._t.values()))) if self._t else 0

    def index(self, idx) -> "Conditions":
        return Conditions({k: v[idx] for k, v in self._t.items()})

    def to(self, device) -> "Conditions":
        return Conditions({k: v.to(device) for k, v in self._t.items()})

    def to_tensors(self, prefix: str = "cond.") -> dict[str, torch.Tensor]:
        return {prefix + k: v.contiguous() for k, v in self._t.items()}

    @classmethod
    def from_tensors(cls, tensors: Mapping, prefix: str = "cond.") -> "Conditions":
        return cls({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
