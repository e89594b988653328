"""The feature network of the bundled MNIST domain: a small digit classifier.

Its penultimate activations (128-d) are the features of FID and IS on this domain, a
pooled intermediate map (64 x 2 x 2) the spatial features of sFID, and its predictions
the class accuracy of generated digits. Trained by ``training/train_mnist_classifier.py``;
the weights ship in ``accuquant/assets/mnist-classifier``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitClassifier(nn.Module):
    """Two conv stages with batch norm (28 -> 14 -> 7) and a 128-unit hidden layer; inputs in [-1, 1]."""

    def __init__(self, width: int = 32, hidden: int = 128, num_classes: int = 10):
        super().__init__()
        self.config = {"width": width, "hidden": hidden, "num_classes": num_classes}
        w = width
        self.stage1 = nn.Sequential(_conv(1, w), _conv(w, w), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(_conv(w, 2 * w), _conv(2 * w, 2 * w), nn.MaxPool2d(2))
        self.fc = nn.Linear(2 * w * 7 * 7, hidden)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pool``: penultimate features; ``spatial``: the 7x7 map pooled to 2x2; ``logits``."""
        h = self.stage2(self.stage1(x))
        pool = F.relu(self.fc(h.flatten(1)))
        return {"pool": pool, "spatial": F.adaptive_avg_pool2d(h, 2).flatten(1), "logits": self.head(pool)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stage2(self.stage1(x))
        return self.head(self.dropout(F.relu(self.fc(h.flatten(1)))))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(self.config, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "DigitClassifier":
        path = Path(path)
        model = cls(**json.loads((path / "config.json").read_text()))
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model.eval()
