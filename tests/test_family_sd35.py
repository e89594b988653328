"""SD3.5 (``SD3Transformer2DModel`` with RMS-normalised Q and K, and Medium's second,
image-only attention in the first blocks) on a tiny config, through the SD3 family's
adapter: diffusers' own sampling, the three methods, save and load, and the quantized
model in diffusers' ``StableDiffusion3Pipeline``."""

import json

import diffusers
import pytest
import torch
from conftest import (
    tiny_t5_encoder,
    tiny_text_encoder_with_projection,
    tiny_vae,
    tokenizer,
)

import accuquant as aq
from accuquant.models import adapter_class
from accuquant.models.sd3 import SD3Adapter
from accuquant.quant.attention import QuantJointAttnProcessor
from accuquant.quant.layers import QuantLayer

W4A8 = aq.QuantConfig(weight_bits=4, act_bits=8)
W8A8 = aq.QuantConfig(weight_bits=8, act_bits=8)
ATTENTION = ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"]


def tiny_sd35_transformer(seed: int = 0):
    """Two joint blocks (the first with the dual attention of SD3.5 Medium, the last one
    context_pre_only) with RMS-normalised Q and K, on 4x8x8 latents; the joint sequence is the
    CLIP encoders' hidden states (8 + 8 wide) followed by T5's (16 wide)."""
    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
        pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,)).eval()


@pytest.fixture
def sd35_pipeline_dir(tmp_path):
    """A tiny standard StableDiffusion3Pipeline directory as SD3.5 ships (two CLIP encoders
    with projection and T5, the CLIP tokenizer for all three; flow matching with shift 3),
    with default prompts, their digits and 8 T5 tokens."""
    tok = tokenizer()
    path = tmp_path / "tiny-sd35"
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.1)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tiny_sd35_transformer(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=tiny_text_encoder_with_projection(len(tok), 8, 1), tokenizer=tok,
        text_encoder_2=tiny_text_encoder_with_projection(len(tok), 8, 2), tokenizer_2=tok,
        text_encoder_3=tiny_t5_encoder(len(tok)), tokenizer_3=tok)
    pipe.save_pretrained(str(path))
    (path / "accuquant_sampling.json").write_text(json.dumps({
        "guidance_scale": 3.5, "prompts": ["a handwritten one", "the digit 7"], "prompt_labels": [1, 7],
        "max_sequence_length": 8}))
    return path


def _reference(pipe, prompt, steps, guidance, noise):
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(),
                max_sequence_length=8, output_type="latent").images


def test_sd35_samples_as_diffusers_does(sd35_pipeline_dir):
    """Prompt encoding (three encoders, empty negative prompt), guidance and the shifted
    flow-matching Euler steps are diffusers' own."""
    ours = aq.load(sd35_pipeline_dir)
    assert adapter_class(ours.model) is SD3Adapter and ours.sampling_settings() == (20, "flow-euler")
    theirs = diffusers.StableDiffusion3Pipeline.from_pretrained(str(sd35_pipeline_dir))
    cond = ours.conditions(1, prompts=["the digit 7"])
    assert cond["embeds"].shape == (1, 16 + 8, 16) and cond["pooled"].shape == (1, 16)  # CLIP's 16 tokens, T5's 8
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = aq.run_trajectory(ours.denoiser(3.5), ours.solver(3), noise, cond)
    torch.testing.assert_close(x, _reference(theirs, "the digit 7", 3, 3.5, noise), atol=1e-5, rtol=1e-4)


def test_the_quantized_joint_and_dual_attention_compute_what_diffusers_does(sd35_pipeline_dir):
    """With quantization off, the quantized processors of the joint attention and of the second,
    image-only attention (RMS-normalised Q and K in both) are diffusers' own."""
    from accuquant.calibrate.block_data import quantization_disabled

    fp = aq.load(sd35_pipeline_dir)
    model = fp.copy().model
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 80.0])
    cond = fp.conditions(2, prompts=["the digit 7", "a handwritten one"])
    with torch.no_grad():
        ref = fp.denoiser().raw(x, t, cond)
        den = aq.make_denoiser(model)
        report = den.wrap(W8A8)
        assert report.attention == ATTENTION and not report.attention_fp
        assert all(isinstance(model.get_submodule(n).processor, QuantJointAttnProcessor) for n in ATTENTION)
        with quantization_disabled(model):
            out = den.raw(x, t, cond)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["naive", "per-step", "accuquant"])
def test_sd35_quantizes_with_each_method_and_loads_back(sd35_pipeline_dir, tmp_path, method):
    kw = {"per-step": {"iters": 2, "act_iters": 1, "samples_per_step": 2},
          "accuquant": {"iters": 2, "group_size": 2, "traj_batch": 2, "init_iters": 2, "init_act_iters": 1,
                        "init_samples": 2}}.get(method, {})
    q = aq.quantize(str(sd35_pipeline_dir), W4A8, method, steps=3, calib_samples=2, progress=False, **kw)
    report = q.quant.report
    assert set(report.kept_fp) == {"pos_embed.proj", "norm_out.linear", "proj_out"}  # patch embedding, final layer
    assert report.attention == ATTENTION and not report.attention_fp
    block = q.model.transformer_blocks[0]
    assert isinstance(block.norm1.linear, QuantLayer)  # SD3.5's AdaLayerNormZeroX: the dual attention's modulation
    assert all(isinstance(getattr(block.attn2, p), QuantLayer) for p in ("to_q", "to_k", "to_v"))
    assert {n for n in report.other_fp if ".norm_" in n} >= {"transformer_blocks.0.attn.norm_q",
                                                            "transformer_blocks.0.attn2.norm_k"}  # RMSNorm: FP
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        assert not any(isinstance(m, QuantLayer) for m in q.components[name].modules())
    if method == "per-step":
        blocks = q.quant.method_log["blocks"]
        assert {"transformer_blocks.0", "transformer_blocks.1"} <= set(blocks), list(blocks)
    x = q.sample(2, steps=3, progress=False)
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    q.save(tmp_path / "q")
    back = aq.load(tmp_path / "q")
    assert back.quant.report.attention == ATTENTION
    assert torch.equal(back.sample(2, steps=3, progress=False), x)


def test_a_quantized_sd35_runs_in_diffusers_own_pipeline(sd35_pipeline_dir):
    q = aq.quantize(str(sd35_pipeline_dir), W4A8, "naive", steps=2, calib_samples=2, progress=False)
    pipe = q.to_diffusers()
    assert isinstance(pipe, diffusers.StableDiffusion3Pipeline) and pipe.transformer is q.model
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x = aq.run_trajectory(q.denoiser(3.5), q.solver(2), noise, q.conditions(1, prompts=["the digit 7"]))
    torch.testing.assert_close(x, _reference(pipe, "the digit 7", 2, 3.5, noise), atol=1e-5, rtol=1e-4)
