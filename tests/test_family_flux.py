"""FLUX.1 (``FluxTransformer2DModel``) on a tiny config: diffusers' own sampling, the three
methods, save and load, and the quantized model in diffusers' ``FluxPipeline``."""

import diffusers
import pytest
import torch

import accuquant as aq
from accuquant.quant.layers import QuantLayer

W4A8 = aq.QuantConfig(weight_bits=4, act_bits=8)


def _diffusers_latents(pipe, noise, prompt, steps, cfg):
    """``FluxPipeline``'s samples from ``noise`` (unpacked latents), unpacked again."""
    b, c, h, w = noise.shape
    packed = diffusers.FluxPipeline._pack_latents(noise.clone(), b, c, h, w)
    out = pipe(prompt, negative_prompt="", true_cfg_scale=cfg, num_inference_steps=steps, latents=packed,
               height=2 * h, width=2 * w, max_sequence_length=8,
               output_type="latent").images
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def test_flux_samples_as_diffusers_does(flux_pipeline_dir):
    """Packing, rotary ids, prompt encoding, true CFG against the empty prompt and the dynamic
    shift are diffusers' own."""
    ours = aq.load(flux_pipeline_dir)
    theirs = diffusers.FluxPipeline.from_pretrained(str(flux_pipeline_dir))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    solver = ours.solver(3)
    assert solver.describe()["mu"] == pytest.approx(0.4567 + 16 * (1.15 - 0.5) / (4096 - 256), abs=1e-3)
    x = aq.run_trajectory(ours.denoiser(2.0), solver, noise, ours.conditions(1, prompts=["the digit 7"]))
    ref = _diffusers_latents(theirs, noise, "the digit 7", 3, 2.0)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["naive", "per-step", "accuquant"])
def test_flux_quantizes_with_each_method_and_loads_back(flux_pipeline_dir, tmp_path, method):
    kw = {"per-step": dict(iters=2, act_iters=1, samples_per_step=2),
          "accuquant": dict(iters=2, group_size=2, traj_batch=2, init_iters=2, init_act_iters=1, init_samples=2)}.get(method, {})
    q = aq.quantize(str(flux_pipeline_dir), W4A8, method, steps=3, calib_samples=2, progress=False, **kw)
    assert q.quant.report.attention  # both kinds of block's attention, rotary embeddings included
    assert any(".single_transformer_blocks." in n or n.startswith("single_transformer_blocks") for n in q.quant.report.attention)
    assert "x_embedder" in q.quant.report.kept_fp and "proj_out" in q.quant.report.kept_fp
    assert not any(isinstance(m, QuantLayer) for m in q.components["text_encoder_2"].modules())
    x = q.sample(2, steps=3, progress=False)
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    q.save(tmp_path / "q")
    back = aq.load(tmp_path / "q")
    assert torch.equal(back.sample(2, steps=3, progress=False), x)


def test_a_quantized_flux_runs_in_diffusers_own_pipeline(flux_pipeline_dir):
    q = aq.quantize(str(flux_pipeline_dir), W4A8, "naive", steps=2, calib_samples=2, progress=False)
    pipe = q.to_diffusers()
    assert isinstance(pipe, diffusers.FluxPipeline) and pipe.transformer is q.model
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = _diffusers_latents(pipe, noise, "the digit 7", 2, 2.0)
    x = aq.run_trajectory(q.denoiser(2.0), q.solver(2), noise, q.conditions(1, prompts=["the digit 7"]))
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-4)


def test_a_guidance_distilled_flux_takes_the_scale_through_its_embedding(flux_pipeline_dir):
    """FLUX.1-dev: one evaluation per step, the scale in the guidance embedding."""
    from tests.conftest import tiny_flux_transformer

    pipe = aq.load(flux_pipeline_dir)
    pipe.model = tiny_flux_transformer(guidance_embeds=True)
    den = pipe.denoiser(3.5)
    assert not den.guided
    x = torch.randn(2, 4, 8, 8)
    cond = pipe.conditions(2)
    a, b = den(x, torch.tensor(500.0), cond), pipe.denoiser(1.0)(x, torch.tensor(500.0), cond)
    assert den.evaluations["forward"] == 2 and not torch.equal(a, b)
