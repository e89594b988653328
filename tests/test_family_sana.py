"""Sana (``SanaTransformer2DModel``) on a tiny config: diffusers' own sampling, the three
methods, save and load, the quantized model in diffusers' ``SanaPipeline``, and the
quantized attention processors (linear self-attention, masked cross-attention)."""

import json

import diffusers
import pytest
import torch

import accuquant as aq
from accuquant.quant.processors import QuantSanaAttnProcessor, QuantSanaLinearAttnProcessor
from accuquant.quant.layers import QuantLayer
from tests.conftest import tokenizer

W4A8 = aq.QuantConfig(weight_bits=4, act_bits=8, act_init="minmax")  # minmax: quick ranges for tiny tests


def tiny_sana_transformer(seed: int = 0, **kw):
    """Two blocks on 4x8x8 latents; cross-attention over 16-wide Gemma states; a timestep
    scale other than 1 (the pipeline multiplies by it)."""
    torch.manual_seed(seed)
    return diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=1, mlp_ratio=2.5, timestep_scale=0.5, **kw).eval()


def tiny_dc_ae(seed: int = 0):
    """A two-level DC-AE: 3x16x16 images to 4x8x8 latents, scaling factor as Sana's."""
    torch.manual_seed(seed)
    return diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)), scaling_factor=0.41).eval()


def tiny_gemma2(vocab_size: int, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    return transformers.Gemma2Model(transformers.Gemma2Config(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, pad_token_id=1, bos_token_id=0, eos_token_id=1)).eval()


@pytest.fixture
def sana_pipeline_dir(tmp_path):
    """A tiny standard SanaPipeline directory (Gemma 2 encoder with the bundled CLIP tokenizer,
    DC-AE, DPM-Solver in flow mode as Sana ships it), with default prompts and 8 text tokens."""
    tok = tokenizer()
    path = tmp_path / "tiny-sana"
    sched = diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    diffusers.SanaPipeline(tokenizer=tok, text_encoder=tiny_gemma2(len(tok)), vae=tiny_dc_ae(),
                           transformer=tiny_sana_transformer(), scheduler=sched).save_pretrained(str(path))
    (path / "accuquant_sampling.json").write_text(json.dumps({
        "guidance_scale": 2.0, "prompts": ["a handwritten one", "the digit 7"], "prompt_labels": [1, 7],
        "max_sequence_length": 8}))
    return path


def _diffusers_latents(pipe, noise, prompt, steps, cfg):
    """``SanaPipeline``'s samples from ``noise``, without the complex human instruction (the
    height and width only pass its checks: the latents are given)."""
    return pipe(prompt, negative_prompt="", guidance_scale=cfg, num_inference_steps=steps, latents=noise.clone(),
                height=32, width=32, max_sequence_length=8, complex_human_instruction=None,
                use_resolution_binning=False, output_type="latent").images


def test_sana_samples_and_decodes_as_diffusers_does(sana_pipeline_dir):
    """Prompt encoding (embeddings and mask), the timestep scale, guidance against the empty
    prompt and the flow schedule of the DPM-Solver config are diffusers' own; the DC-AE
    decodes without a shift."""
    ours = aq.load(sana_pipeline_dir)
    theirs = diffusers.SanaPipeline.from_pretrained(str(sana_pipeline_dir))
    theirs.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = ours.conditions(1, prompts=["the digit 7"])
    assert set(cond) == {"embeds", "mask", "negative_embeds", "negative_mask"}
    assert (cond["mask"] == 0).any() and (cond["mask"] == 1).any()  # padding masked out of cross-attention
    x = aq.run_trajectory(ours.denoiser(2.0), ours.solver(3), noise, cond)
    ref = _diffusers_latents(theirs, noise, "the digit 7", 3, 2.0)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-4)
    img = ours.decode(x.detach())
    assert img.shape == (1, *ours.denoiser().image_shape) == (1, 3, 16, 16)
    with torch.no_grad():
        ref_img = theirs.image_processor.postprocess(theirs.vae.decode(ref / 0.41).sample, output_type="pt")
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["naive", "per-step", "accuquant"])
def test_sana_quantizes_with_each_method_and_loads_back(sana_pipeline_dir, tmp_path, method):
    kw = {"per-step": {"iters": 2, "act_iters": 1, "samples_per_step": 2},
          "accuquant": {"iters": 2, "group_size": 2, "traj_batch": 2, "init_iters": 2, "init_act_iters": 1,
                        "init_samples": 2}}.get(method, {})
    q = aq.quantize(str(sana_pipeline_dir), W4A8, method, steps=3, calib_samples=2, progress=False, **kw)
    x = q.sample(2, steps=3, progress=False)
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    q.save(tmp_path / "q")
    back = aq.load(tmp_path / "q")
    assert torch.equal(back.sample(2, steps=3, progress=False), x)


def test_sana_quantizes_both_attentions_and_keeps_its_ends_fp(sana_pipeline_dir):
    """Linear self-attention and masked cross-attention get their quantized twins; the
    depthwise conv of the Mix-FFN is a grouped quantized conv; patch embedding and final
    layer stay FP, as do the text encoder and the VAE."""
    q = aq.quantize(str(sana_pipeline_dir), W4A8, "naive", steps=2, calib_samples=2, progress=False)
    r = q.quant.report
    assert r.attention == [f"transformer_blocks.{b}.attn{a}" for b in (0, 1) for a in (1, 2)] and not r.attention_fp
    blocks = q.model.transformer_blocks
    assert isinstance(blocks[0].attn1.processor, QuantSanaLinearAttnProcessor)
    assert isinstance(blocks[0].attn2.processor, QuantSanaAttnProcessor)
    assert set(blocks[0].attn1.processor.quantizers()) == {"q_quant", "k_quant", "v_quant"}  # no softmax
    assert set(r.kept_fp) == {"patch_embed.proj", "proj_out"}
    depth = blocks[0].ff.conv_depth
    assert isinstance(depth, QuantLayer) and depth.module.groups == depth.module.in_channels > 1
    assert "transformer_blocks.0.ff.conv_depth" in r.quantized and "caption_projection.linear_1" in r.quantized
    for comp in ("text_encoder", "vae"):
        assert not any(isinstance(m, QuantLayer) for m in q.components[comp].modules())


def test_a_quantized_sana_runs_in_diffusers_own_pipeline(sana_pipeline_dir):
    q = aq.quantize(str(sana_pipeline_dir), W4A8, "naive", steps=2, calib_samples=2, progress=False)
    pipe = q.to_diffusers()
    assert isinstance(pipe, diffusers.SanaPipeline) and pipe.transformer is q.model
    assert isinstance(pipe.scheduler, diffusers.FlowMatchEulerDiscreteScheduler)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = _diffusers_latents(pipe, noise, "the digit 7", 2, 2.0)
    x = aq.run_trajectory(q.denoiser(2.0), q.solver(2), noise, q.conditions(1, prompts=["the digit 7"]))
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-4)


def _sana_attention(cross: bool, qk_norm=None):
    from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0
    from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

    torch.manual_seed(0)
    proc = SanaAttnProcessor2_0() if cross else SanaLinearAttnProcessor2_0()
    return Attention(query_dim=16, heads=2, dim_head=8, cross_attention_dim=12 if cross else None, bias=True,
                     qk_norm=qk_norm, kv_heads=2 if qk_norm else None, processor=proc).eval()


@torch.no_grad()
def test_the_linear_attention_twin_keeps_diffusers_arithmetic():
    """Without bits, the quantized linear attention is diffusers' bit for bit (upcast,
    padding row, normaliser); with bits, only Q, K and V are quantized."""
    attn = _sana_attention(cross=False)
    x = torch.randn(2, 12, 16)
    ref = attn(x)
    attn.set_processor(QuantSanaLinearAttnProcessor(None, None))
    assert torch.equal(attn(x), ref)
    proc = QuantSanaLinearAttnProcessor(8, 8)
    attn.set_processor(proc)
    for q in proc.quantizers().values():
        q.set_range(torch.tensor(-4.0), torch.tensor(4.0))
    out = attn(x)
    assert not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.1)


@torch.no_grad()
def test_the_cross_attention_twin_masks_and_normalises_as_diffusers():
    attn = _sana_attention(cross=True, qk_norm="rms_norm_across_heads")
    x, ctx = torch.randn(2, 10, 16), torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    bias = ((1 - mask.float()) * -10000.0).unsqueeze(1)  # as SanaTransformer2DModel passes it
    ref = attn(x, encoder_hidden_states=ctx, attention_mask=bias)
    attn.set_processor(QuantSanaAttnProcessor(None, None))
    torch.testing.assert_close(attn(x, encoder_hidden_states=ctx, attention_mask=bias), ref, atol=1e-6, rtol=1e-5)


def test_a_guidance_distilled_sana_is_refused():
    pipe = aq.Pipeline(tiny_sana_transformer(guidance_embeds=True), {})
    with pytest.raises(aq.AccuQuantError, match="guidance_embeds"):
        pipe.denoiser()
