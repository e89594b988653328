"""Tiny diffusers models built from configs (no network), shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path

# The models here are tiny: one thread per process runs them faster than two threads that
# wait on each other, in the test process and in the processes it starts (the caller's
# setting, if any, stands)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import diffusers
import pytest
import torch

import accuquant as aq


def tiny_unet(num_class_embeds: int | None = 11, channels=(32, 64), in_channels: int = 1, seed: int = 0,
              sample_size: int = 16):
    """A tiny untrained UNet2DModel: two levels (the second with attention), class-conditional
    with ``num_class_embeds`` labels (the last one the null class) or unconditional (``None``).
    ``tiny_unet(channels=(16, 32), sample_size=28)`` is the 28x28 digit model of
    :func:`digit_pipeline_dir`."""
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    ).eval()


def tiny_cond_unet(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def tiny_dit(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).eval()


def ddim_config() -> dict:
    return dict(diffusers.DDIMScheduler().config)


def class_pipeline(**kw) -> aq.Pipeline:
    """A class-conditional pipeline with a null class (10) for classifier-free guidance."""
    return aq.Pipeline(tiny_unet(**kw), ddim_config(), defaults=aq.SamplingDefaults(2.0, 10, 10))


def text_conditions(n: int, seed: int = 0) -> aq.Conditions:
    g = torch.Generator().manual_seed(seed)
    return aq.Conditions(embeds=torch.randn(n, 5, 16, generator=g), negative_embeds=torch.zeros(n, 5, 16))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Calibration caches go to a per-test folder, never the user's."""
    monkeypatch.setenv("ACCUQUANT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny_pipeline_dir(tmp_path):
    """A tiny unconditional DDPM pipeline saved to disk, as a user would have it."""
    unet = tiny_unet(num_class_embeds=None, in_channels=3, channels=(16, 32))
    path = tmp_path / "tiny-pipeline"
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(str(path))
    return path


def save_digit_pipeline(path: Path) -> Path:
    """A tiny class-conditional 28x28 DDIM pipeline (10 classes and the null class) saved to
    ``path``, with sampling defaults (guidance 2)."""
    import json

    sched = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    unet = tiny_unet(channels=(16, 32), sample_size=28)
    diffusers.DDIMPipeline(unet=unet, scheduler=sched).save_pretrained(str(path))
    (path / "accuquant_sampling.json").write_text(json.dumps({"guidance_scale": 2.0, "num_classes": 10,
                                                              "null_class": 10}))
    return path


@pytest.fixture
def digit_pipeline_dir(tmp_path):
    """The tiny 28x28 class-conditional pipeline of :func:`save_digit_pipeline`, on disk."""
    return save_digit_pipeline(tmp_path / "digits")


def text_pipeline_and_calibration(steps: int = 3, num: int = 2):
    """A tiny text-conditioned pipeline (SD-style UNet, DDIM) and FP trajectories of ``num``
    samples over ``steps`` steps with random prompt embeddings."""
    fp = aq.Pipeline(tiny_cond_unet(), dict(diffusers.DDIMScheduler().config))
    calib = aq.collect_trajectories(fp.denoiser(), aq.make_solver("ddim", fp.scheduler_config, steps), num,
                                    cond=text_conditions(num), progress=False)
    return fp, calib


def tiny_vae(seed: int = 0):
    """1x16x16 images to 4x8x8 latents."""
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16),
                                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                   layers_per_block=1, norm_num_groups=4, sample_size=16).eval()


def tiny_text_encoder(vocab_size: int, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()


def tokenizer():
    """The bundled text model's tokenizer (CLIP's byte-pair encoding over a digit vocabulary)."""
    import transformers

    from accuquant import bundled

    return transformers.CLIPTokenizer.from_pretrained(str(bundled.ASSETS / "mnist-sd" / "tokenizer"))


@pytest.fixture
def sd_pipeline_dir(tmp_path):
    """A tiny standard StableDiffusionPipeline directory (VAE, CLIP text encoder and tokenizer,
    cross-attention UNet), with default prompts and their digits."""
    import json

    tok = tokenizer()
    path = tmp_path / "tiny-sd"
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(len(tok)), tokenizer=tok, unet=tiny_cond_unet(),
        scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    (path / "accuquant_sampling.json").write_text(json.dumps({
        "guidance_scale": 2.0, "prompts": ["a handwritten one", "the digit 7"], "prompt_labels": [1, 7]}))
    return path


@pytest.fixture
def dit_pipeline_dir(tmp_path):
    """A tiny standard DiTPipeline directory whose unconditional label is DiTPipeline's 1000."""
    import json

    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                          num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    path = tmp_path / "tiny-dit"
    diffusers.DiTPipeline(transformer=dit, vae=tiny_vae(), scheduler=diffusers.DDIMScheduler(clip_sample=False)
                          ).save_pretrained(str(path))
    (path / "accuquant_sampling.json").write_text(json.dumps({"guidance_scale": 2.0, "num_classes": 10,
                                                              "null_class": 1000}))
    return path


def tiny_text_encoder_with_projection(vocab_size: int, hidden: int, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=hidden, bos_token_id=0, eos_token_id=1,
        pad_token_id=1)).eval()


def tiny_sd3_transformer(seed: int = 0):
    """An MMDiT of two joint blocks (the last one context_pre_only) on 4x8x8 latents; the
    joint sequence is the two CLIP encoders' hidden states (8 + 8 wide, zero-padded to 16)."""
    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
        pos_embed_max_size=8).eval()


@pytest.fixture
def sd3_pipeline_dir(tmp_path):
    """A tiny standard StableDiffusion3Pipeline directory (flow matching; two CLIP encoders with
    projection, no T5), with default prompts and their digits."""
    import json

    tok = tokenizer()
    path = tmp_path / "tiny-sd3"
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.1)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=tiny_text_encoder_with_projection(len(tok), 8, 1), tokenizer=tok,
        text_encoder_2=tiny_text_encoder_with_projection(len(tok), 8, 2), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(str(path))
    (path / "accuquant_sampling.json").write_text(json.dumps({
        "guidance_scale": 3.0, "prompts": ["a handwritten one", "the digit 7"], "prompt_labels": [1, 7]}))
    return path


def tiny_t5_encoder(vocab_size: int, d_model: int = 16, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    return transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=1, eos_token_id=1,
        decoder_start_token_id=1)).eval()


def tiny_flux_transformer(seed: int = 0, guidance_embeds: bool = False):
    """One double-stream and one single-stream block on 4x8x8 latents packed to 16 tokens."""
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4)
    ).eval()


@pytest.fixture
def flux_pipeline_dir(tmp_path):
    """A tiny standard FluxPipeline directory (CLIP pooled + T5 sequence, the CLIP tokenizer
    for both; dynamic shift), with default prompts, their digits and the latent size."""
    import json

    tok = tokenizer()
    path = tmp_path / "tiny-flux"
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.1)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = diffusers.FluxPipeline(transformer=tiny_flux_transformer(), scheduler=sched, vae=vae,
                                  text_encoder=tiny_text_encoder(len(tok)), tokenizer=tok,
                                  text_encoder_2=tiny_t5_encoder(len(tok)), tokenizer_2=tok)
    pipe.save_pretrained(str(path))
    (path / "accuquant_sampling.json").write_text(json.dumps({
        "guidance_scale": 2.0, "prompts": ["a handwritten one", "the digit 7"], "prompt_labels": [1, 7],
        "max_sequence_length": 8, "sample_size": 8}))
    return path
