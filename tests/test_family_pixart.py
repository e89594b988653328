"""PixArt-Σ (``PixArtTransformer2DModel``) on a tiny config: diffusers' own sampling (DDIM
and DPM-Solver++), the three methods, save and load, and the quantized model in diffusers'
``PixArtSigmaPipeline``."""

import json

import diffusers
import pytest
import torch
from conftest import tiny_t5_encoder, tiny_vae, tokenizer

import accuquant as aq
from accuquant.models import adapter_class
from accuquant.models.pixart import PixArtAdapter
from accuquant.quant.attention import QuantAttnProcessor
from accuquant.quant.layers import QuantLayer

W4A8 = aq.QuantConfig(weight_bits=4, act_bits=8)
W8A8 = aq.QuantConfig(weight_bits=8, act_bits=8)
ADALN = ("adaln_single.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_2",
         "adaln_single.linear")


def tiny_pixart_transformer(seed: int = 0):
    """Two blocks on 4x8x8 latents in 2x2 patches, a learned-variance output (8 channels), the
    16-wide T5 sequence projected by the caption projection."""
    torch.manual_seed(seed)
    return diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=16, caption_channels=16, patch_size=2, norm_type="ada_norm_single",
        use_additional_conditions=False, norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000,
    ).eval()


@pytest.fixture
def pixart_pipeline_dir(tmp_path):
    """A tiny standard PixArtSigmaPipeline directory (T5 encoder with the CLIP tokenizer, the
    DPM-Solver++ scheduler PixArt-Σ ships), with default prompts, their digits and 8 T5 tokens."""
    tok = tokenizer()
    path = tmp_path / "tiny-pixart"
    pipe = diffusers.PixArtSigmaPipeline(tokenizer=tok, text_encoder=tiny_t5_encoder(len(tok)), vae=tiny_vae(),
                                         transformer=tiny_pixart_transformer(),
                                         scheduler=diffusers.DPMSolverMultistepScheduler())
    pipe.save_pretrained(str(path))
    (path / "accuquant_sampling.json").write_text(json.dumps({
        "guidance_scale": 4.5, "prompts": ["a handwritten one", "the digit 7"], "prompt_labels": [1, 7],
        "max_sequence_length": 8}))
    return path


def _reference(pipe, prompt, steps, guidance, noise):
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(), clean_caption=False,
                use_resolution_binning=False, max_sequence_length=8, output_type="latent").images


@pytest.mark.parametrize("solver, scheduler", [("ddim", "DDIMScheduler"), ("dpm++", "DPMSolverMultistepScheduler")])
def test_pixart_samples_as_diffusers_does(pixart_pipeline_dir, solver, scheduler):
    """T5 encoding with its attention mask, the empty negative prompt, guidance and the
    learned-variance half dropped are diffusers' own."""
    ours = aq.load(pixart_pipeline_dir)
    assert adapter_class(ours.model) is PixArtAdapter
    theirs = diffusers.PixArtSigmaPipeline.from_pretrained(str(pixart_pipeline_dir))
    theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config)
    cond = ours.conditions(1, prompts=["the digit 7"])
    assert cond["embeds"].shape == (1, 8, 16) and cond["mask"].shape == (1, 8)
    assert 0 < cond["negative_mask"].sum() < cond["mask"].sum() < 8  # padding tokens are masked out
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = aq.run_trajectory(ours.denoiser(4.5), ours.solver(3, solver), noise, cond)
    torch.testing.assert_close(x, _reference(theirs, "the digit 7", 3, 4.5, noise), atol=1e-5, rtol=1e-4)


def test_the_quantized_attention_computes_what_diffusers_does_with_the_mask(pixart_pipeline_dir):
    """With quantization off, the quantized processors (self-attention, and cross-attention
    with the prompt's padding masked) are diffusers' own."""
    from accuquant.calibrate.block_data import quantization_disabled

    fp = aq.load(pixart_pipeline_dir)
    model = fp.copy().model
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 80])
    cond = fp.conditions(2, prompts=["the digit 7", "a handwritten one"])
    with torch.no_grad():
        ref = fp.denoiser().raw(x, t, cond)
        den = aq.make_denoiser(model)
        report = den.wrap(W8A8)
        assert len(report.attention) == 4 and not report.attention_fp
        with quantization_disabled(model):
            out = den.raw(x, t, cond)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["naive", "per-step", "accuquant"])
def test_pixart_quantizes_with_each_method_and_loads_back(pixart_pipeline_dir, tmp_path, method):
    kw = {"per-step": {"iters": 2, "act_iters": 1, "samples_per_step": 2},
          "accuquant": {"iters": 2, "group_size": 2, "traj_batch": 2, "init_iters": 2, "init_act_iters": 1,
                        "init_samples": 2}}.get(method, {})
    q = aq.quantize(str(pixart_pipeline_dir), W4A8, method, steps=3, calib_samples=2, progress=False, **kw)
    report = q.quant.report
    assert set(report.kept_fp) == {"pos_embed.proj", "proj_out", *ADALN}  # patch embedding, final layer, adaLN-single
    assert sorted(report.attention) == [f"transformer_blocks.{b}.attn{k}" for b in (0, 1) for k in (1, 2)]
    assert all(isinstance(q.model.get_submodule(n).processor, QuantAttnProcessor) for n in report.attention)
    assert isinstance(q.model.caption_projection.linear_1, QuantLayer)
    assert not any(isinstance(m, QuantLayer) for m in q.components["text_encoder"].modules())
    if method == "per-step":
        blocks = q.quant.method_log["blocks"]
        assert {"caption_projection", "transformer_blocks.0", "transformer_blocks.1"} <= set(blocks), list(blocks)
    x = q.sample(2, steps=3, progress=False)
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    q.save(tmp_path / "q")
    back = aq.load(tmp_path / "q")
    assert torch.equal(back.sample(2, steps=3, progress=False), x)


def test_a_quantized_pixart_runs_in_diffusers_own_pipeline(pixart_pipeline_dir):
    q = aq.quantize(str(pixart_pipeline_dir), W4A8, "naive", steps=2, calib_samples=2, progress=False)
    pipe = q.to_diffusers()
    assert isinstance(pipe, diffusers.PixArtSigmaPipeline) and pipe.transformer is q.model
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x = aq.run_trajectory(q.denoiser(4.5), q.solver(2), noise, q.conditions(1, prompts=["the digit 7"]))
    torch.testing.assert_close(x, _reference(pipe, "the digit 7", 2, 4.5, noise), atol=1e-5, rtol=1e-4)
