"""The model families users quantize, as standard diffusers pipeline directories: Stable
Diffusion (text-to-image, latent) and DiT (class-conditional transformer, latent)."""

import diffusers
import pytest
import torch

import accuquant as aq
from accuquant.quant.layers import QuantLayer
from accuquant.cli import main

W4A8 = aq.QuantConfig(weight_bits=4, act_bits=8)
FAST_PER_STEP = dict(iters=2, act_iters=1, samples_per_step=2)


def _quantized(module) -> bool:
    return any(isinstance(m, QuantLayer) for m in module.modules())


def test_sd_samples_as_diffusers_does(sd_pipeline_dir):
    """The adapter's guided sampling (prompt encoding, empty negative prompt, DDIM) is diffusers' own."""
    ours = aq.load(sd_pipeline_dir)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_pipeline_dir))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = ours.conditions(1, prompts=["the digit 7"])
    solver = aq.make_solver("ddim", ours.scheduler_config, 3)
    x = aq.run_trajectory(ours.denoiser(2.0), solver, noise, cond)
    ref = theirs("the digit 7", num_inference_steps=3, guidance_scale=2.0, latents=noise.clone(),
                 output_type="latent").images
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-4)


def test_sd_quantizes_with_its_default_prompts_and_loads_back(sd_pipeline_dir, tmp_path):
    fp = aq.load(sd_pipeline_dir)
    assert fp.defaults.prompts == ["a handwritten one", "the digit 7"]
    assert fp.class_labels(3).tolist() == [1, 7, 1]
    q = aq.quantize(str(sd_pipeline_dir), W4A8, "per-step", steps=2, calib_samples=2, progress=False, **FAST_PER_STEP)
    blocks = q.quant.method_log["blocks"]
    assert any(name.endswith("transformer_blocks.0") for name in blocks)  # BasicTransformerBlock with cross-attention
    assert q.quant.report.attention  # attention matmuls quantized too
    assert not _quantized(q.components["text_encoder"]) and not _quantized(q.components["vae"])
    x = q.sample(2, steps=2, progress=False)
    # the default prompts were used: the same as passing them
    assert torch.equal(x, q.sample(2, steps=2, prompts=["a handwritten one", "the digit 7"], progress=False))
    assert not torch.equal(x, q.sample(2, steps=2, prompts=["a handwritten two"], progress=False))
    q.save(tmp_path / "q")
    back = aq.load(tmp_path / "q")
    assert back.defaults.prompts == fp.defaults.prompts
    assert torch.equal(back.sample(2, steps=2, progress=False), x)
    assert back.decode(x).shape == (2, 1, 16, 16)


def test_a_quantized_sd_runs_in_diffusers_own_pipeline(sd_pipeline_dir):
    q = aq.quantize(str(sd_pipeline_dir), W4A8, "naive", steps=2, calib_samples=2, progress=False)
    pipe = q.to_diffusers()
    assert isinstance(pipe, diffusers.StableDiffusionPipeline) and pipe.unet is q.model
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = pipe("the digit 7", num_inference_steps=2, guidance_scale=2.0, latents=noise.clone(),
               output_type="latent").images
    x = aq.run_trajectory(q.denoiser(2.0), aq.make_solver("ddim", q.scheduler_config, 2), noise,
                          q.conditions(1, prompts=["the digit 7"]))
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-4)
    images = pipe("a handwritten one", num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 1, 16, 16) and torch.isfinite(images).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_pipeline_is_calibrated_in_float32_and_kept_in_its_dtype(sd_pipeline_dir, tmp_path, dtype):
    half = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_pipeline_dir), torch_dtype=dtype)
    q = aq.quantize(half, W4A8, "naive", steps=2, calib_samples=2, prompts=["the digit 7"], progress=False)
    assert q.quant.dtype == str(dtype).removeprefix("torch.")
    assert {p.dtype for p in q.model.parameters() if p.is_floating_point()} == {dtype}
    assert half.unet.dtype == dtype and not _quantized(half.unet)  # the source is untouched
    # the same model upcast to float32 calibrates to the same step sizes (calibration ran in float32)
    full = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_pipeline_dir), torch_dtype=dtype).to(torch.float32)
    q32 = aq.quantize(full, W4A8, "naive", steps=2, calib_samples=2, prompts=["the digit 7"], progress=False)
    assert q.model.conv_in.weight.dtype == dtype  # kept in full precision, in the user's dtype
    # weight step sizes depend on the weights alone: the same; activation ranges also see the
    # prompt embeddings, which the user's half-precision text encoder computes
    params32 = dict(q32.model.named_parameters())
    weight_scales = {n: p for n, p in q.model.named_parameters() if "weight_quant" in n and n.endswith("scale")}
    assert weight_scales and all(torch.equal(p, params32[n].to(dtype)) for n, p in weight_scales.items())
    x = q.sample(2, steps=2, prompts=["the digit 7"], progress=False)
    x32 = q32.sample(2, steps=2, prompts=["the digit 7"], progress=False)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert (x - x32).norm() / x32.norm() < 0.05  # only the half-precision arithmetic differs
    q.save(tmp_path / "q")
    back = aq.load(tmp_path / "q")
    assert back.model.dtype == dtype and back.components["vae"].dtype == dtype
    assert torch.equal(back.sample(2, steps=2, prompts=["the digit 7"], progress=False), x)


def test_dit_pipeline_directory_quantizes_and_runs_in_diffusers(dit_pipeline_dir, tmp_path):
    fp = aq.load(dit_pipeline_dir)
    assert fp.denoiser().null_class == 1000 and fp.num_classes == 10
    q = aq.quantize(str(dit_pipeline_dir), W4A8, "per-step", steps=2, calib_samples=2, progress=False,
                    **FAST_PER_STEP)
    assert any(name.endswith("transformer_blocks.0") for name in q.quant.method_log["blocks"])
    kept = q.quant.report.kept_fp
    assert "pos_embed.proj" in kept and "proj_out_2" in kept
    q.save(tmp_path / "q")
    back = aq.load(tmp_path / "q")
    labels = torch.tensor([3, 8])
    assert torch.equal(back.sample(2, steps=2, labels=labels, progress=False),
                       q.sample(2, steps=2, labels=labels, progress=False))
    pipe = back.to_diffusers()
    assert isinstance(pipe, diffusers.DiTPipeline)
    # diffusers' loop (its null label 1000, its guidance) gives what accuquant's does
    images = pipe([3], num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = aq.run_trajectory(back.denoiser(2.0), aq.make_solver("ddim", back.scheduler_config, 2), noise,
                          back.conditions(1, labels=[3]))
    assert images.shape == (1, 1, 16, 16)
    torch.testing.assert_close(back.decode(x), images, atol=1e-5, rtol=1e-4)


def test_bundled_models_are_chosen_by_name_unless_a_local_directory_has_that_name(tmp_path, monkeypatch):
    from accuquant import bundled

    assert bundled.resolve_ref("mnist-sd") == str(bundled.ASSETS / "mnist-sd")
    assert bundled.resolve_ref("bundled:mnist-dit") == str(bundled.ASSETS / "mnist-dit")
    assert bundled.model_ref(bundled.ASSETS / "mnist-sd") == "bundled:mnist-sd"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist-sd").mkdir()
    assert bundled.resolve_ref("mnist-sd") == "mnist-sd"  # the user's own directory
    assert bundled.resolve_ref("other") == "other"


def test_a_class_conditional_unet_is_not_handed_to_a_pipeline_that_drops_its_labels(digit_pipeline_dir):
    with pytest.raises(aq.AccuQuantError, match="cannot condition"):
        aq.load(digit_pipeline_dir).to_diffusers()


def test_cli_quantizes_sd_from_a_prompt_file(sd_pipeline_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the digit 3\n\n  a handwritten nine  \n")
    out = tmp_path / "q"
    args = ["quantize", "--model", str(sd_pipeline_dir), "--method", "naive", "--steps", "2", "--calib-samples",
            "2", "--out", str(out), "--quiet"]
    assert main(args + ["--prompt-file", str(prompts)]) == 0
    assert (out / "unet" / "accuquant_weights.safetensors").is_file()
    capsys.readouterr()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    assert main(args + ["--prompt-file", str(empty), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "no prompts in the file" in err and "Traceback" not in err
    assert main(args + ["--prompt-file", str(tmp_path / "missing.txt"), "--overwrite"]) == 2
    assert "cannot read the prompt file" in capsys.readouterr().err


@pytest.mark.parametrize("sampling, message", [
    ({"prompts": "the digit 7"}, "'prompts' must be a list of strings"),
    ({"prompts": ["a", "b"], "prompt_labels": [1]}, "one per prompt"),
    ({"prompts": ["a"], "prompt_labels": "1"}, "list of integers"),
])
def test_bad_default_prompts_are_one_line_errors(sd_pipeline_dir, tmp_path, capsys, sampling, message):
    import json

    (sd_pipeline_dir / "accuquant_sampling.json").write_text(json.dumps(sampling))
    code = main(["sample", "--model", str(sd_pipeline_dir), "--out", str(tmp_path / "g.png"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "accuquant_sampling.json" in err and "Traceback" not in err
