"""Flow-matching MMDiTs (Stable Diffusion 3 style) as standard diffusers pipeline directories:
sampling as diffusers does, joint attention quantized, both streams of a joint block
reconstructed, saved and loaded back, run in diffusers' own pipeline."""

import diffusers
import torch

import accuquant as aq
from accuquant.quant.attention import QuantJointAttnProcessor
from accuquant.quant.layers import QuantLayer

W8A8 = aq.QuantConfig(weight_bits=8, act_bits=8)
W4A8 = aq.QuantConfig(weight_bits=4, act_bits=8)


def _reference(pipe, prompt, steps, guidance, noise):
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(),
                output_type="latent").images


def test_sd3_samples_as_diffusers_does(sd3_pipeline_dir):
    """Prompt encoding (two CLIP encoders, no T5, empty negative prompt), guidance and the
    flow-matching Euler steps are diffusers' own; flow-euler is the model's default solver."""
    ours = aq.load(sd3_pipeline_dir)
    assert ours.sampling_settings() == (20, "flow-euler")
    # (a pipeline without T5 is loaded in diffusers by saying so)
    theirs = diffusers.StableDiffusion3Pipeline.from_pretrained(str(sd3_pipeline_dir), text_encoder_3=None,
                                                                tokenizer_3=None)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = aq.run_trajectory(ours.denoiser(3.0), aq.make_solver(None, ours.scheduler_config, 4), noise,
                          ours.conditions(1, prompts=["the digit 7"]))
    torch.testing.assert_close(x, _reference(theirs, "the digit 7", 4, 3.0, noise), atol=1e-5, rtol=1e-4)
    images = ours.decode(x)  # through the VAE's scaling and shift factors
    latents = x / theirs.vae.config.scaling_factor + theirs.vae.config.shift_factor
    ref = (theirs.vae.decode(latents).sample.clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(images, ref, atol=1e-5, rtol=1e-4)


def test_joint_attention_processor_computes_what_diffusers_does(sd3_pipeline_dir):
    """With quantization off, the quantized joint processor is the diffusers one."""
    from accuquant.calibrate.block_data import quantization_disabled

    fp = aq.load(sd3_pipeline_dir)
    model = diffusers.SD3Transformer2DModel.from_pretrained(str(sd3_pipeline_dir / "transformer")).eval()
    x = torch.randn(2, 4, 8, 8)
    cond = fp.conditions(2, prompts=["the digit 7", "a handwritten one"])
    kw = dict(encoder_hidden_states=cond["embeds"], pooled_projections=cond["pooled"], timestep=torch.tensor([500., 80.]))
    with torch.no_grad():
        ref = model(x, **kw).sample
        report = aq.make_denoiser(model).wrap(W8A8)
        assert len(report.attention) == 2 and not report.attention_fp
        assert all(isinstance(b.attn.processor, QuantJointAttnProcessor) for b in model.transformer_blocks)
        with quantization_disabled(model):
            out = model(x, **kw).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_sd3_quantizes_per_step_with_both_streams_and_loads_back(sd3_pipeline_dir, tmp_path):
    q = aq.quantize(str(sd3_pipeline_dir), W4A8, "per-step", steps=3, calib_samples=2, progress=False, iters=2,
                    act_iters=1, samples_per_step=2)
    assert q.sampling_settings() == (3, "flow-euler")  # calibrated on the model's own solver
    blocks = q.quant.method_log["blocks"]
    joint = [n for n in blocks if n.startswith("transformer_blocks.")]
    assert joint == ["transformer_blocks.0", "transformer_blocks.1"]  # each joint block one unit
    assert all(blocks[n]["loss"] >= 0 for n in joint)
    kept = set(q.quant.report.kept_fp)
    assert {"pos_embed.proj", "proj_out", "norm_out.linear"} <= kept
    assert isinstance(q.model.context_embedder, QuantLayer)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert not any(isinstance(m, QuantLayer) for m in q.components[name].modules())
    x = q.sample(2, steps=3, progress=False)
    assert torch.isfinite(x).all()
    q.save(tmp_path / "q")
    back = aq.load(tmp_path / "q")
    assert torch.equal(back.sample(2, steps=3, progress=False), x)
    pipe = back.to_diffusers()  # diffusers' own loop on the quantized transformer
    assert isinstance(pipe, diffusers.StableDiffusion3Pipeline) and pipe.transformer is back.model
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = aq.run_trajectory(back.denoiser(3.0), aq.make_solver(None, back.scheduler_config, 3), noise,
                             back.conditions(1, prompts=["the digit 7"]))
    torch.testing.assert_close(ours, _reference(pipe, "the digit 7", 3, 3.0, noise), atol=1e-5, rtol=1e-4)


def test_accuquant_simulates_flow_steps(sd3_pipeline_dir):
    """AccuQuant on a flow trajectory: groups of M flow steps, finite losses, and step sizes
    that move away from the initialisation's."""
    kw = dict(steps=4, calib_samples=4, progress=False)
    init = aq.quantize(str(sd3_pipeline_dir), W4A8, "naive", **kw)
    q = aq.quantize(str(sd3_pipeline_dir), W4A8, "accuquant", init="naive", iters=10, group_size=2, traj_batch=2, **kw)
    log = q.quant.method_log
    assert [tuple(g) for g in log["groups"]] == [(0, 2), (2, 2)]
    assert log["evaluations"]["backward"] > 0
    assert torch.isfinite(torch.tensor(log["loss_curve"])).all()
    before, after = dict(init.model.named_parameters()), dict(q.model.named_parameters())
    scales = [k for k in after if k.endswith("quant.0.scale")]
    moved = [k for k in scales if not torch.equal(after[k], before[k])]
    assert len(scales) > 20 and len(moved) > len(scales) // 2


def test_sd3_from_the_command_line(sd3_pipeline_dir, tmp_path, capsys):
    """quantize (on the model's default flow-euler solver) and sample an SD3 directory. (Its 16x16
    images fit no bundled feature network, so evaluation is left to the bundled SD3 model.)"""
    from accuquant.cli import main

    out = tmp_path / "q"
    assert main(["quantize", "--model", str(sd3_pipeline_dir), "--method", "naive", "--steps", "3",
                 "--calib-samples", "2", "--out", str(out), "--quiet", "--prompt", "the digit 3"]) == 0
    assert (out / "transformer" / "accuquant_weights.safetensors").is_file()
    assert aq.load(out).sampling_settings() == (3, "flow-euler")
    assert main(["sample", "--model", str(out), "--num", "2", "--out", str(tmp_path / "g.png"), "--quiet"]) == 0
    assert "3 flow-euler steps" in capsys.readouterr().out
