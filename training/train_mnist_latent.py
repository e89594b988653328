"""Train the bundled latent diffusion models on the VAE's 4x8x8 latents of 32x32 MNIST digits:

* ``--family sd``: ``mnist-sd``, a standard ``StableDiffusionPipeline`` directory. A
  ``UNet2DConditionModel`` (blocks of 32 and 64 channels at 8x8 and 4x4, one resnet and one
  transformer block with self- and cross-attention (dimension 64) per level and in the mid
  block; the prompt embedding, attention-pooled, is also added to the timestep embedding,
  diffusers' ``addition_embed_type="text"``: through cross-attention alone the model had
  learned to follow the prompt for 26% of digits after 10 epochs, against 78% for the DiT's
  adaLN labels), a tiny ``CLIPTextModel`` (2 layers, width 64, 16 tokens) and a ``CLIPTokenizer``
  whose vocabulary is written here (:mod:`captions`). Captions are drawn from templates
  such as "a handwritten seven" or "the digit 7"; 10% are empty, for classifier-free
  guidance. The text encoder is trained with the UNet (there is no pretrained CLIP to
  freeze).
* ``--family dit``: ``mnist-dit``, a standard ``DiTPipeline`` directory. A class-conditional
  ``DiTTransformer2DModel`` (patch size 2, so 16 tokens; 6 blocks of width 128, 4 heads,
  adaLN-zero). Its label table has diffusers' 1,000 ImageNet rows plus the null row, as
  ``DiTPipeline`` hard-codes label 1000 for the unconditional branch; only rows 0 to 9 and
  1000 are trained (the model's own 10% label dropout).

* ``--family sd3``: ``mnist-sd3``, a standard ``StableDiffusion3Pipeline`` directory trained
  with flow matching. An ``SD3Transformer2DModel`` (MMDiT: 4 joint blocks of width 128, 4
  heads, patch size 2; image and text tokens attend together), two tiny
  ``CLIPTextModelWithProjection`` encoders (2 layers, width 64) sharing the tokenizer of
  ``mnist-sd``, no T5 (the pipeline pads the joint sequence with zeros in its place); the
  VAE's latents are shifted by their mean (``shift_factor``, as SD3's VAE). Rectified flow:
  ``x_s = (1 - s) x_0 + s eps`` with ``s`` drawn from a logit-normal distribution (SD3's),
  the model predicts ``eps - x_0``; sampled with ``FlowMatchEulerDiscreteScheduler``
  (shift 1). Without T5, diffusers fills its slot of the joint sequence with
  ``max_sequence_length`` zero tokens (256 by default: 17 times the image's 16 tokens, and
  11 minutes an epoch here); the model is trained and sampled with 1
  (``accuquant_sampling.json``; plain diffusers: ``pipe(prompt, max_sequence_length=1)``). The prompt embeddings come from the pipeline's own ``encode_prompt`` during
  training, so training and sampling encode prompts the same way.

* ``--family flux``: ``mnist-flux``, a standard ``FluxPipeline`` directory trained with flow
  matching as ``sd3``. A ``FluxTransformer2DModel`` (2 double-stream and 4 single-stream
  blocks of width 128, 4 heads, rotary position embeddings over axes of 8, 12 and 12
  dimensions, no guidance embedding, as FLUX.1-schnell) on the 4x8x8 latents packed into
  16 tokens of 16 channels; a tiny ``CLIPTextModel`` (pooled: the conditioning vector) and a
  tiny ``T5EncoderModel`` (2 layers, width 64: the text sequence), both with the tokenizer
  of ``mnist-sd`` (captions are at most 8 tokens: ``max_sequence_length`` 8, stored with the
  model). FLUX.1's scheduler (shift 3 with dynamic shifting: at 16 tokens ``mu`` = 0.459);
  it is sampled with true classifier-free guidance against the empty prompt (plain diffusers:
  ``pipe(prompt, negative_prompt="", true_cfg_scale=2.0, height=32, width=32,
  max_sequence_length=8)``). The VAE is ``mnist-sd3``'s (``--vae src/accuquant/assets/mnist-sd3/vae``).

Shared recipe (sd, dit): cosine noise schedule (1,000 steps), noise prediction, MSE loss, latents
sampled from the VAE posterior and multiplied by its ``scaling_factor``; AdamW (lr 1e-3,
200 warm-up iterations, cosine decay), batch 128, gradient clipping at 1, EMA of the weights
(decay 0.999) is what is saved; DDIM sampling with "leading" spacing and no clipping, as the
bundled pixel model (see train_mnist_unet.py). Training split: the 9,000 digits not held out.

    python training/train_mnist_latent.py --family sd --vae runs/mnist-vae --data path/to/mnist10k.npz \
        --out src/accuquant/assets/mnist-sd

Everything is seeded; the pipeline is rewritten (atomically) after every epoch.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import diffusers
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from captions import DIGIT_WORDS, build_tokenizer, caption, eval_prompts, write_vocabulary  # noqa: E402
from mnist_data import start, to_tensor  # noqa: E402
from recipe import cosine_lr, ema_update, save_atomically  # noqa: E402

DIT_NULL_CLASS = 1000  # DiTPipeline's unconditional label


def noise_schedule() -> diffusers.DDPMScheduler:
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                   prediction_type="epsilon", clip_sample=False)


def sampling_scheduler() -> diffusers.DDIMScheduler:
    return diffusers.DDIMScheduler.from_config(noise_schedule().config, timestep_spacing="leading", steps_offset=1,
                                               clip_sample=False)


def build_text_encoder(vocab_size: int):
    import transformers

    cfg = transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                      projection_dim=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return transformers.CLIPTextModel(cfg)


def build_unet() -> diffusers.UNet2DConditionModel:
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,  # the number of heads, in this class's naming
        norm_num_groups=8,
        addition_embed_type="text",  # the prompt, attention-pooled, added to the timestep embedding
        addition_embed_type_num_heads=4,
    )


def build_dit() -> diffusers.DiTTransformer2DModel:
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        num_layers=6,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=DIT_NULL_CLASS,
    )


_ACP = noise_schedule().alphas_cumprod


def noised(z0, g):
    """A uniform timestep per row and ``z0`` noised to it: ``(x_t, t, noise)``."""
    t = torch.randint(0, 1000, (len(z0),), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    a = _ACP[t].view(-1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise, t, noise


def build_sd3() -> diffusers.SD3Transformer2DModel:
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=128,
        pos_embed_max_size=8)


def build_text_encoder_with_projection(vocab_size: int):
    import transformers

    cfg = transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                      projection_dim=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return transformers.CLIPTextModelWithProjection(cfg)


def half(module):
    """A float16 copy, for storage: the package ships its models in half the space, and
    diffusers loads them back as float32. (The tiny text encoder is kept in float32, as
    recent transformers would load a float16 file as float16.)"""
    return copy.deepcopy(module).half()


class SD:
    """The text-to-image family: the UNet and the text encoder learn together."""

    def __init__(self, args):
        self.tokenizer = build_tokenizer()
        self.text_encoder = build_text_encoder(len(self.tokenizer))
        self.unet = build_unet()
        self.trained = torch.nn.ModuleDict({"unet": self.unet, "text_encoder": self.text_encoder})
        self.empty = args.label_dropout

    def loss(self, z0, labels, g):
        xt, t, noise = noised(z0, g)
        texts = [caption(int(y), g) if torch.rand((), generator=g) >= self.empty else "" for y in labels]
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        embeds = self.text_encoder(ids)[0]
        return F.mse_loss(self.unet(xt, t, encoder_hidden_states=embeds).sample, noise)

    def save(self, ema, vae, tmp):
        pipe = diffusers.StableDiffusionPipeline(
            vae=half(vae), text_encoder=ema["text_encoder"], tokenizer=self.tokenizer, unet=half(ema["unet"]),
            scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.save_pretrained(tmp)
        # the slow tokenizer files as well, for transformers versions that read only those
        write_vocabulary(os.path.join(tmp, "tokenizer"))

    def sampling(self, args) -> dict:
        prompts, labels = eval_prompts()
        return {"guidance_scale": args.guidance_scale, "prompts": prompts, "prompt_labels": labels}


class DiT:
    """The class-conditional transformer family."""

    def __init__(self, args):
        self.dit = build_dit()
        self.trained = torch.nn.ModuleDict({"transformer": self.dit})

    def loss(self, z0, labels, g):
        xt, t, noise = noised(z0, g)
        return F.mse_loss(self.dit(xt, timestep=t, class_labels=labels).sample, noise)

    def save(self, ema, vae, tmp):
        id2label = {i: w for i, w in enumerate(DIGIT_WORDS)}
        diffusers.DiTPipeline(transformer=half(ema["transformer"]), vae=half(vae), scheduler=sampling_scheduler(),
                              id2label=id2label).save_pretrained(tmp)

    def sampling(self, args) -> dict:
        return {"guidance_scale": args.guidance_scale, "num_classes": 10, "null_class": DIT_NULL_CLASS}


class SD3:
    """The flow-matching MMDiT family: the transformer and both text encoders learn together."""

    def __init__(self, args):
        self.tokenizer = build_tokenizer()
        self.transformer = build_sd3()
        self.text_encoder = build_text_encoder_with_projection(len(self.tokenizer))
        self.text_encoder_2 = build_text_encoder_with_projection(len(self.tokenizer))
        self.trained = torch.nn.ModuleDict({"transformer": self.transformer, "text_encoder": self.text_encoder,
                                            "text_encoder_2": self.text_encoder_2})
        self.empty = args.label_dropout
        self.seq = args.max_sequence_length
        self.pipe = self.pipeline(self.trained, None)  # its encode_prompt, on the modules being trained

    def pipeline(self, modules, vae):
        return diffusers.StableDiffusion3Pipeline(
            transformer=modules["transformer"], scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0),
            vae=vae, text_encoder=modules["text_encoder"], tokenizer=self.tokenizer,
            text_encoder_2=modules["text_encoder_2"], tokenizer_2=self.tokenizer, text_encoder_3=None,
            tokenizer_3=None)

    def loss(self, z0, labels, g):
        s = torch.sigmoid(torch.randn(len(z0), generator=g)).view(-1, 1, 1, 1)  # logit-normal, as SD3
        noise = torch.randn(z0.shape, generator=g)
        texts = [caption(int(y), g) if torch.rand((), generator=g) >= self.empty else "" for y in labels]
        embeds, _, pooled, _ = self.pipe.encode_prompt(texts, None, None, device=torch.device("cpu"),
                                                       do_classifier_free_guidance=False, max_sequence_length=self.seq)
        out = self.transformer((1 - s) * z0 + s * noise, encoder_hidden_states=embeds, pooled_projections=pooled,
                               timestep=s.flatten() * 1000).sample
        return F.mse_loss(out, noise - z0)

    def save(self, ema, vae, tmp):
        pipe = self.pipeline({"transformer": half(ema["transformer"]), "text_encoder": ema["text_encoder"],
                              "text_encoder_2": ema["text_encoder_2"]}, half(vae))
        pipe.save_pretrained(tmp)
        write_vocabulary(os.path.join(tmp, "tokenizer"))
        write_vocabulary(os.path.join(tmp, "tokenizer_2"))

    def sampling(self, args) -> dict:
        prompts, labels = eval_prompts()
        return {"guidance_scale": args.guidance_scale, "prompts": prompts, "prompt_labels": labels,
                "max_sequence_length": args.max_sequence_length}


def build_flux() -> diffusers.FluxTransformer2DModel:
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False,
        axes_dims_rope=(8, 12, 12))


def build_t5(vocab_size: int):
    import transformers

    cfg = transformers.T5Config(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                feed_forward_proj="gated-gelu", pad_token_id=1, eos_token_id=1,
                                decoder_start_token_id=1, tie_word_embeddings=False)
    return transformers.T5EncoderModel(cfg)


def flux_scheduler() -> diffusers.FlowMatchEulerDiscreteScheduler:
    """FLUX.1's scheduler: shift 3 with dynamic shifting, so the shift is ``exp(mu)`` with ``mu``
    interpolated from the image's token count (16 here: ``mu`` = 0.459)."""
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


class Flux:
    """The FLUX.1 family (``FluxTransformer2DModel``: double-stream then single-stream blocks,
    rotary position embeddings, no guidance embedding, as FLUX.1-schnell): the transformer,
    the CLIP encoder (pooled) and the T5 encoder (sequence) learn together."""

    def __init__(self, args):
        self.tokenizer = build_tokenizer()
        self.transformer = build_flux()
        self.text_encoder = build_text_encoder(len(self.tokenizer))
        self.text_encoder_2 = build_t5(len(self.tokenizer))
        self.trained = torch.nn.ModuleDict({"transformer": self.transformer, "text_encoder": self.text_encoder,
                                            "text_encoder_2": self.text_encoder_2})
        self.empty = args.label_dropout
        self.seq = args.max_sequence_length
        self.pipe = self.pipeline(self.trained, None)

    def pipeline(self, modules, vae):
        return diffusers.FluxPipeline(
            transformer=modules["transformer"], scheduler=flux_scheduler(), vae=vae,
            text_encoder=modules["text_encoder"], tokenizer=self.tokenizer,
            text_encoder_2=modules["text_encoder_2"], tokenizer_2=self.tokenizer)

    def loss(self, z0, labels, g):
        s = torch.sigmoid(torch.randn(len(z0), generator=g))  # logit-normal, as SD3 and FLUX
        noise = torch.randn(z0.shape, generator=g)
        texts = [caption(int(y), g) if torch.rand((), generator=g) >= self.empty else "" for y in labels]
        embeds, pooled, txt_ids = self.pipe.encode_prompt(texts, None, device=torch.device("cpu"),
                                                          max_sequence_length=self.seq)
        b, c, h, w = z0.shape
        pack = diffusers.FluxPipeline._pack_latents
        img_ids = diffusers.FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", z0.dtype)
        sv = s.view(-1, 1, 1, 1)
        out = self.transformer(pack((1 - sv) * z0 + sv * noise, b, c, h, w), encoder_hidden_states=embeds,
                               pooled_projections=pooled, timestep=s, img_ids=img_ids, txt_ids=txt_ids).sample
        return F.mse_loss(out, pack(noise - z0, b, c, h, w))

    def save(self, ema, vae, tmp):
        pipe = self.pipeline({"transformer": half(ema["transformer"]), "text_encoder": ema["text_encoder"],
                              "text_encoder_2": ema["text_encoder_2"]}, half(vae))
        pipe.save_pretrained(tmp)
        write_vocabulary(os.path.join(tmp, "tokenizer"))
        write_vocabulary(os.path.join(tmp, "tokenizer_2"))

    def sampling(self, args) -> dict:
        prompts, labels = eval_prompts()
        return {"guidance_scale": args.guidance_scale, "prompts": prompts, "prompt_labels": labels,
                "max_sequence_length": args.max_sequence_length, "sample_size": 8}


FAMILIES = {"sd": SD, "dit": DiT, "sd3": SD3, "flux": Flux}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=tuple(FAMILIES), required=True)
    p.add_argument("--vae", required=True, help="the VAE directory written by train_mnist_vae.py")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1, help="share of empty prompts (sd)")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="default guidance stored with the model")
    p.add_argument("--max-sequence-length", type=int, default=1, help="sd3: zero tokens in the absent T5 "
                   "encoder's slot (diffusers' default is 256; 1 keeps the joint sequence at 16 + 17 tokens, "
                   "and is stored with the model as its sampling default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    images, labels, train, _ = start(args)
    vae = diffusers.AutoencoderKL.from_pretrained(args.vae, low_cpu_mem_usage=False).eval().requires_grad_(False)
    with torch.no_grad():
        x = to_tensor(images[train], pad=2)
        post = [vae.encode(x[i : i + 500]).latent_dist for i in range(0, len(x), 500)]
        mean, std = torch.cat([q.mean for q in post]), torch.cat([q.std for q in post])
    scale = vae.config.scaling_factor
    y_all = torch.from_numpy(labels[train])
    if args.family in ("sd3", "flux"):  # SD3's and FLUX's VAEs shifts latents by their mean before scaling them
        shift = mean.mean().item()
        vae.register_to_config(shift_factor=shift)
        mean = mean - shift
    fam = FAMILIES[args.family](args)
    ema = copy.deepcopy(fam.trained).eval().requires_grad_(False)
    opt = torch.optim.AdamW(fam.trained.parameters(), lr=args.lr, weight_decay=0.0)
    iters = math.ceil(len(mean) / args.batch_size)
    total = iters * args.epochs
    lr_sched = cosine_lr(opt, total, warmup=200)
    g = torch.Generator().manual_seed(args.seed)
    n_params = {k: sum(q.numel() for q in m.parameters()) for k, m in fam.trained.items()}
    print(f"training {n_params} parameters on {len(mean)} latents, {total} iterations", flush=True)
    t0 = time.time()
    step = 0
    for epoch in range(args.epochs):
        perm = torch.randperm(len(mean), generator=g)
        fam.trained.train()
        losses = []
        for b in range(iters):
            idx = perm[b * args.batch_size : (b + 1) * args.batch_size]
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
            loss = fam.loss(z0, y_all[idx], g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(fam.trained.parameters(), 1.0)
            opt.step()
            lr_sched.step()
            step += 1
            ema_update(ema, fam.trained, step, args.ema)
            losses.append(loss.item())
        elapsed = time.time() - t0
        meta = {"epochs_done": epoch + 1, "iterations": step, "seconds": round(elapsed, 1),
                "final_epoch_loss": sum(losses) / len(losses), "parameters": n_params,
                "args": vars(args) | {"data": "mnist10k.npz", "vae": "mnist-vae"},
                "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": args.threads}
        save_atomically(args.out, lambda tmp: fam.save(ema, vae, tmp),
                        {"accuquant_sampling.json": fam.sampling(args), "training.json": meta})
        print(f"epoch {epoch + 1}/{args.epochs} loss {meta['final_epoch_loss']:.4f} time {elapsed / 60:.1f} min",
              flush=True)


if __name__ == "__main__":
    main()
