"""SDXL (``UNet2DConditionModel`` with text-time micro-conditioning) on a tiny config:
diffusers' own sampling, the three methods, save and load, and the quantized model in
diffusers' ``StableDiffusionXLPipeline``."""

import json

import diffusers
import pytest
import torch
from conftest import (
    tiny_text_encoder,
    tiny_text_encoder_with_projection,
    tiny_vae,
    tokenizer,
)

import accuquant as aq
from accuquant.models import adapter_class
from accuquant.models.sdxl import SDXLAdapter
from accuquant.models.unet import UNet2DConditionAdapter
from accuquant.quant.attention import QuantAttnProcessor
from accuquant.quant.layers import QuantLayer

W4A8 = aq.QuantConfig(weight_bits=4, act_bits=8)


def tiny_sdxl_unet(seed: int = 0):
    """Two levels (the second with cross-attention) on 4x8x8 latents; the sequence is the two
    encoders' hidden states (16 + 8 wide), the added embedding six 4-wide size features and
    the second encoder's 8-wide pooled projection."""
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8,
    ).eval()


@pytest.fixture
def sdxl_pipeline_dir(tmp_path):
    """A tiny standard StableDiffusionXLPipeline directory (CLIP and CLIP with projection, DDIM
    as SDXL's scaled-linear schedule), with default prompts and their digits."""
    tok = tokenizer()
    path = tmp_path / "tiny-sdxl"
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, steps_offset=1, set_alpha_to_one=False)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(len(tok)), tokenizer=tok,
        text_encoder_2=tiny_text_encoder_with_projection(len(tok), 8, 2), tokenizer_2=tok, unet=tiny_sdxl_unet(),
        scheduler=sched, add_watermarker=False)
    pipe.save_pretrained(str(path))
    (path / "accuquant_sampling.json").write_text(json.dumps({
        "guidance_scale": 5.0, "prompts": ["a handwritten one", "the digit 7"], "prompt_labels": [1, 7]}))
    return path


def _reference(pipe, prompt, steps, guidance, noise):
    """``StableDiffusionXLPipeline``'s default call: no negative prompt, the model's image size."""
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(),
                output_type="latent").images


def test_sdxl_samples_as_diffusers_does(sdxl_pipeline_dir):
    """Prompt encoding (both encoders, zero negatives for the empty negative prompt), the size
    micro-conditions and guidance are diffusers' own."""
    ours = aq.load(sdxl_pipeline_dir)
    assert adapter_class(ours.model) is SDXLAdapter and not UNet2DConditionAdapter.matches(ours.model)
    assert adapter_class("UNet2DConditionModel") is UNet2DConditionAdapter  # by name: SD's, the general one
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_pipeline_dir), add_watermarker=False)
    cond = ours.conditions(1, prompts=["the digit 7"])
    assert cond["embeds"].shape == (1, 16, 24) and cond["pooled"].shape == (1, 8)
    assert not cond["negative_embeds"].any() and not cond["negative_pooled"].any()  # force_zeros_for_empty_prompt
    assert ours.denoiser().time_ids(torch.zeros(2, 4, 8, 8)).tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = aq.run_trajectory(ours.denoiser(5.0), ours.solver(3), noise, cond)
    torch.testing.assert_close(x, _reference(theirs, "the digit 7", 3, 5.0, noise), atol=1e-5, rtol=1e-4)


def test_without_forced_zeros_the_unconditional_branch_is_the_empty_prompt(sdxl_pipeline_dir, monkeypatch):
    monkeypatch.setattr(SDXLAdapter, "force_zeros_for_empty_prompt", False)
    ours = aq.load(sdxl_pipeline_dir)
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_pipeline_dir), add_watermarker=False,
                                                                 force_zeros_for_empty_prompt=False)
    cond = ours.conditions(1, prompts=["the digit 7"])
    assert cond["negative_embeds"].any() and cond["negative_pooled"].any()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    x = aq.run_trajectory(ours.denoiser(5.0), ours.solver(2), noise, cond)
    torch.testing.assert_close(x, _reference(theirs, "the digit 7", 2, 5.0, noise), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["naive", "per-step", "accuquant"])
def test_sdxl_quantizes_with_each_method_and_loads_back(sdxl_pipeline_dir, tmp_path, method):
    kw = {"per-step": {"iters": 2, "act_iters": 1, "samples_per_step": 2},
          "accuquant": {"iters": 2, "group_size": 2, "traj_batch": 2, "init_iters": 2, "init_act_iters": 1,
                        "init_samples": 2}}.get(method, {})
    q = aq.quantize(str(sdxl_pipeline_dir), W4A8, method, steps=2, calib_samples=2, progress=False, **kw)
    report = q.quant.report
    assert {"conv_in", "conv_out"} <= set(report.kept_fp)
    # self- and cross-attention of every transformer (down, mid, and the up block's two)
    assert sorted(report.attention) == sorted(f"{a}.transformer_blocks.0.attn{k}" for k in (1, 2) for a in (
        "down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1"))
    assert not report.attention_fp
    assert all(isinstance(q.model.get_submodule(n).processor, QuantAttnProcessor) for n in report.attention)
    assert isinstance(q.model.add_embedding.linear_1, QuantLayer)  # the pooled text and size embedding
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert not any(isinstance(m, QuantLayer) for m in q.components[name].modules())
    if method == "per-step":
        assert "add_embedding" in q.quant.method_log["blocks"]  # a TimestepEmbedding, reconstructed as one block
    x = q.sample(2, steps=2, progress=False)
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    q.save(tmp_path / "q")
    back = aq.load(tmp_path / "q")
    assert isinstance(back.denoiser(), SDXLAdapter)
    assert torch.equal(back.sample(2, steps=2, progress=False), x)


def test_a_quantized_sdxl_runs_in_diffusers_own_pipeline(sdxl_pipeline_dir):
    q = aq.quantize(str(sdxl_pipeline_dir), W4A8, "naive", steps=2, calib_samples=2, progress=False)
    pipe = q.to_diffusers()
    assert isinstance(pipe, diffusers.StableDiffusionXLPipeline) and pipe.unet is q.model
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x = aq.run_trajectory(q.denoiser(5.0), q.solver(2), noise, q.conditions(1, prompts=["the digit 7"]))
    torch.testing.assert_close(x, _reference(pipe, "the digit 7", 2, 5.0, noise), atol=1e-5, rtol=1e-4)
