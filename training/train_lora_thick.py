"""Train a "thick strokes" style LoRA for the bundled ``mnist-sd``: its digits drawn with a
pen about twice as wide.

The training images are the MNIST training split's digits dilated by a 3x3 maximum (each
stroke grows by a pixel on every side), padded to 32x32 and encoded by the model's own VAE.
The LoRA (rank ``--rank``, alpha equal to the rank) targets the UNet's attention
projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of self- and cross-attention) and
its resnets' 3x3 convolutions; the UNet, VAE and text encoder stay frozen. Captions are the
base model's (:mod:`captions`), 10% empty for classifier-free guidance; the loss is the base
model's (noise prediction, cosine schedule). The adapter is saved in the diffusers/PEFT
format (``pytorch_lora_weights.safetensors``: ``unet.<module>.lora_A.weight`` and
``lora_B.weight``, the rank and alpha in its metadata), which ``accuquant.quant.lora`` and
``--lora`` read.

    python training/train_lora_thick.py --data path/to/mnist10k.npz --out runs/lora-thick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from captions import caption  # noqa: E402
from mnist_data import start, to_tensor  # noqa: E402
from recipe import cosine_lr  # noqa: E402
from train_mnist_latent import noised  # noqa: E402

import accuquant as aq  # noqa: E402
from accuquant.io.files import atomic_dir  # noqa: E402
from accuquant.quant.lora import load_lora, unload_lora  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


def thick(images: torch.Tensor) -> torch.Tensor:
    """Digits in [-1, 1] with every stroke grown by one pixel (a 3x3 maximum)."""
    return F.max_pool2d(images, 3, stride=1, padding=1)


def targets(unet) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in unet.named_modules()
            if n.rsplit(".", 1)[-1] in TARGETS or n.endswith("to_out.0")
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="mnist-sd")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    images, labels, train, _ = start(args)
    pipe = aq.load(args.model)
    unet, vae = pipe.model, pipe.components["vae"]
    tok, enc = pipe.components["tokenizer"], pipe.components["text_encoder"]
    for m in (unet, vae, enc):
        m.eval().requires_grad_(False)
    with torch.no_grad():
        x = thick(to_tensor(images[train], pad=2))
        post = [vae.encode(x[i:i + 500]).latent_dist for i in range(0, len(x), 500)]
        mean, std = torch.cat([q.mean for q in post]), torch.cat([q.std for q in post])
    scale = vae.config.scaling_factor
    y_all = torch.from_numpy(labels[train])
    g = torch.Generator().manual_seed(args.seed)
    init = {}
    for name, m in targets(unet).items():
        n_in = m.in_features if isinstance(m, torch.nn.Linear) else m.in_channels
        n_out = m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels
        kernel = () if isinstance(m, torch.nn.Linear) else tuple(m.kernel_size)
        fan_in = n_in * math.prod(kernel)
        init[f"unet.{name}.lora_A.weight"] = torch.randn(args.rank, n_in, *kernel, generator=g) / math.sqrt(fan_in)
        init[f"unet.{name}.lora_B.weight"] = torch.zeros(n_out, args.rank, *((1, 1) if kernel else ()))
    names = load_lora(unet, init, "tuning", prefix="unet")
    branches = {n: unet.get_submodule(n).lora_adapters["tuning"] for n in names}
    params = [t for b in branches.values() for t in (b.down, b.up)]
    for t in params:
        t.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    iters = math.ceil(len(mean) / args.batch_size)
    lr_sched = cosine_lr(opt, iters * args.epochs, warmup=50)
    print(f"training a rank-{args.rank} LoRA on {len(names)} layers ({sum(t.numel() for t in params)} parameters), "
          f"{iters * args.epochs} iterations", flush=True)
    t0 = time.time()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(mean), generator=g)
        losses = []
        for b in range(iters):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
            xt, t, noise = noised(z0, g)
            texts = [caption(int(y), g) if torch.rand((), generator=g) >= args.label_dropout else ""
                     for y in y_all[idx]]
            ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            with torch.no_grad():
                embeds = enc(ids)[0]
            loss = F.mse_loss(unet(xt, t, encoder_hidden_states=embeds).sample, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_sched.step()
            losses.append(loss.item())
        print(f"epoch {epoch + 1}/{args.epochs} loss {sum(losses) / len(losses):.4f} "
              f"time {(time.time() - t0) / 60:.1f} min", flush=True)
    from safetensors.torch import save_file

    state = {}
    for name, b in branches.items():
        state[f"unet.{name}.lora_A.weight"] = b.down.detach().contiguous()
        state[f"unet.{name}.lora_B.weight"] = b.up.detach().contiguous()
    unload_lora(unet)
    meta = {"lora_adapter_metadata": json.dumps({"r": args.rank, "lora_alpha": args.rank}),
            "training": json.dumps(vars(args) | {"data": "mnist10k.npz", "seconds": round(time.time() - t0, 1),
                                                 "final_epoch_loss": sum(losses) / len(losses)})}
    with atomic_dir(Path(args.out), overwrite=True) as tmp:
        save_file(state, str(tmp / "pytorch_lora_weights.safetensors"), metadata=meta)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
