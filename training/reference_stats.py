"""The FID floor of the bundled domain: FID (digit-classifier features) between the
training split and the held-out split. A generator cannot be expected to score below it.

    python training/reference_stats.py --data path/to/mnist10k.npz

Writes ``src/accuquant/assets/mnist-classifier/reference.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from mnist_data import load_npz, split_indices  # noqa: E402

from accuquant import bundled  # noqa: E402
from accuquant.eval.evaluation import DigitFeatures  # noqa: E402
from accuquant.eval.metrics import fid_from_features  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", default=str(bundled.CLASSIFIER / "reference.json"))
    args = p.parse_args()
    images, labels = load_npz(args.data)
    train, _ = split_indices(labels)
    feats = DigitFeatures()
    real, real_labels = bundled.heldout()
    f_held = feats(real)
    f_train = feats(torch.from_numpy(images[train]).float().div(255).unsqueeze(1))
    g = torch.Generator().manual_seed(0)
    sub = torch.randperm(len(train), generator=g)[:1000]
    result = {
        "fid_train_vs_heldout": fid_from_features(f_train["pool"], f_held["pool"]),
        "fid_train1000_vs_heldout": fid_from_features(f_train["pool"][sub], f_held["pool"]),
        "sfid_train1000_vs_heldout": fid_from_features(f_train["spatial"][sub], f_held["spatial"]),
        "heldout_accuracy": (f_held["logits"].argmax(1) == real_labels).float().mean().item(),
        "train_images": len(train),
        "heldout_images": len(real),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
