"""The MNIST split shared by the training scripts: a fixed, stratified held-out set.

From ``mnist10k.npz`` (10,000 digits), 100 images per class (1,000 in all) are held out
with a seeded permutation; training never sees them. The held-out images ship inside the
package (``accuquant/assets/mnist_heldout.safetensors``) as the reference set of the
evaluation.
"""

from __future__ import annotations

import numpy as np
import torch

HELDOUT_PER_CLASS = 100
SPLIT_SEED = 0


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    d = np.load(path)
    return d["images"], d["labels"].astype(np.int64)


def split_indices(labels: np.ndarray, per_class: int = HELDOUT_PER_CLASS, seed: int = SPLIT_SEED):
    """Sorted (train, heldout) indices; ``per_class`` held-out images of each digit."""
    rng = np.random.default_rng(seed)
    held = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        held.extend(rng.permutation(idx)[:per_class].tolist())
    held = np.sort(np.array(held))
    train = np.setdiff1d(np.arange(len(labels)), held)
    return train, held


def to_tensor(images: np.ndarray, pad: int = 0) -> torch.Tensor:
    """uint8 (N, 28, 28) in [0, 255] -> float (N, 1, 28 + 2 pad, 28 + 2 pad) in [-1, 1]
    (the padding is background, -1)."""
    x = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)
    return torch.nn.functional.pad(x, (pad,) * 4, value=-1.0) if pad else x


def start(args) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What every training script does first: seed torch, set its threads, read the data
    (``args.seed``, ``args.threads``, ``args.data``); returns images, labels and the
    (train, held-out) indices."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    images, labels = load_npz(args.data)
    return (images, labels, *split_indices(labels))
