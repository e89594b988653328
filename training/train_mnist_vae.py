"""Train the VAE shared by the bundled latent models (``mnist-sd``, ``mnist-dit``): a diffusers
``AutoencoderKL`` from 1x32x32 digits (MNIST padded by 2 background pixels a side: diffusers'
Stable Diffusion pipeline wants image sizes divisible by 8) to 4x8x8 latents.

Recipe: encoder and decoder blocks of 16, 32 and 64 channels (two downsamplings: a factor of
4), one resnet per block, the usual mid-block attention, 4 latent channels. Loss: mean
squared error of the reconstruction plus ``--kl`` times the KL divergence to N(0, 1) (both
means over elements), AdamW (lr 1e-3, cosine decay), batch 128; the training split is the
9,000 digits not held out (see mnist_data.py). The latents' ``scaling_factor`` is set to one
over the standard deviation of the posterior means on the training split, as Stable
Diffusion's was chosen, so that the diffusion models see unit-variance latents.
On 2 CPU threads a first version with 32/64 channels and a factor of 2 cost 2.0 s an
iteration against 0.74 s for 16/32 channels, and bfloat16 autocast was ten times slower
than float32; a factor of 4 keeps the diffusion models' training affordable on a CPU.

    python training/train_mnist_vae.py --data path/to/mnist10k.npz --out runs/mnist-vae

Writes the VAE directory (``from_pretrained`` loads it) with ``training.json`` holding the
recipe, the time taken and the held-out reconstruction PSNR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import diffusers
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from mnist_data import start, to_tensor  # noqa: E402
from recipe import cosine_lr, save_atomically  # noqa: E402


def build_vae() -> diffusers.AutoencoderKL:
    return diffusers.AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


@torch.no_grad()
def psnr_db(vae, x: torch.Tensor, batch: int = 500) -> float:
    """Mean PSNR (images in [0, 1]) of reconstructions from the posterior means, on the 28x28
    digit (the padding left out)."""
    vals = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        rec = vae.decode(vae.encode(xb).latent_dist.mean).sample.clamp(-1, 1)
        mse = ((rec - xb) / 2)[..., 2:30, 2:30].pow(2).flatten(1).mean(1).clamp_min(1e-10)
        vals.append(-10 * torch.log10(mse))
    return torch.cat(vals).mean().item()


@torch.no_grad()
def latent_std(vae, x: torch.Tensor, batch: int = 500) -> float:
    means = torch.cat([vae.encode(x[i : i + batch]).latent_dist.mean for i in range(0, len(x), batch)])
    return means.std().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl", type=float, default=1e-4, help="weight of the KL term")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    images, labels, train, held = start(args)
    x_all, x_held = to_tensor(images[train], pad=2), to_tensor(images[held], pad=2)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    iters = math.ceil(len(x_all) / args.batch_size)
    total = iters * args.epochs
    lr_sched = cosine_lr(opt, total)
    g = torch.Generator().manual_seed(args.seed)
    n_params = sum(q.numel() for q in vae.parameters())
    print(f"training a {n_params / 1e6:.2f} M-parameter VAE on {len(x_all)} images, {total} iterations", flush=True)
    t0 = time.time()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x_all), generator=g)
        vae.train()
        rec_sum = kl_sum = 0.0
        for b in range(iters):
            x = x_all[perm[b * args.batch_size : (b + 1) * args.batch_size]]
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
            rec = F.mse_loss(vae.decode(z).sample, x)
            kl = 0.5 * (post.mean.pow(2) + post.var - 1 - post.logvar).mean()
            loss = rec + args.kl * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_sched.step()
            rec_sum += rec.item()
            kl_sum += kl.item()
        print(f"epoch {epoch + 1}/{args.epochs} rec {rec_sum / iters:.5f} kl {kl_sum / iters:.3f} "
              f"time {(time.time() - t0) / 60:.1f} min", flush=True)
    seconds = time.time() - t0
    vae.eval()
    std = latent_std(vae, x_all)
    vae.register_to_config(scaling_factor=1.0 / std)
    meta = {
        "parameters": n_params,
        "seconds": round(seconds, 1),
        "iterations": total,
        "latent_shape": [4, 8, 8],
        "latent_std": std,
        "scaling_factor": 1.0 / std,
        "heldout_psnr_db": psnr_db(vae, x_held),
        "train_psnr_db": psnr_db(vae, x_all[:1000]),
        "args": vars(args) | {"data": "mnist10k.npz"},
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
    save_atomically(args.out, vae.save_pretrained, {"training.json": meta})
    print(json.dumps({k: meta[k] for k in ("seconds", "scaling_factor", "heldout_psnr_db", "train_psnr_db")}), flush=True)


if __name__ == "__main__":
    main()
