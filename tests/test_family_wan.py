"""Wan 2.1 text-to-video (``WanTransformer3DModel``) on a tiny config: 5-D video latents,
diffusers' own sampling and decoding, the three methods, save and load, the quantized
model in diffusers' ``WanPipeline``, its attention processor, and what is refused (image
outputs of a video model, image-to-video models)."""

import json
from pathlib import Path

import diffusers
import pytest
import torch

import accuquant as aq
from accuquant.cli import main
from accuquant.quant.processors import QuantWanAttnProcessor
from accuquant.quant.layers import QuantLayer
from tests.conftest import tokenizer

W4A8 = aq.QuantConfig(weight_bits=4, act_bits=8, act_init="minmax")  # minmax: quick ranges for tiny tests
PROMPT = "the digit 7"


def tiny_wan_transformer(seed: int = 0, **kw):
    """Two blocks over 4-channel latents in 1x2x2 patches; 12-wide heads (rotary: 4 for
    frames, 4 for rows, 4 for columns); cross-attention over 16-wide UMT5 states."""
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, **kw).eval()


def tiny_wan_vae(seed: int = 0):
    """Wan's causal 3-D VAE at its real factors (8 in space, 4 in time), 4 latent channels."""
    torch.manual_seed(seed)
    return diffusers.AutoencoderKLWan(
        base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0]).eval()


def tiny_umt5(vocab_size: int, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    return transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=1, eos_token_id=1,
        decoder_start_token_id=1)).eval()


def save_wan_pipeline(path: Path) -> Path:
    """A tiny standard WanPipeline directory (UMT5 with the bundled CLIP tokenizer, UniPC in
    flow mode as Wan ships it), sampled as 2 latent frames (5 video frames) of 4x6 latents
    (32x48 pixels), with default prompts and 8 text tokens."""
    tok = tokenizer()
    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    diffusers.WanPipeline(tokenizer=tok, text_encoder=tiny_umt5(len(tok)), vae=tiny_wan_vae(),
                          transformer=tiny_wan_transformer(), scheduler=sched).save_pretrained(str(path))
    (path / "accuquant_sampling.json").write_text(json.dumps({
        "guidance_scale": 2.0, "prompts": ["a handwritten one", PROMPT], "max_sequence_length": 8,
        "sample_size": [4, 6], "num_frames": 2}))
    return path


@pytest.fixture
def wan_pipeline_dir(tmp_path):
    return save_wan_pipeline(tmp_path / "tiny-wan")


def _diffusers_video(pipe, noise, steps, cfg, output_type="latent"):
    """``WanPipeline``'s latents (or frames) from ``noise``: 2 latent frames are 5 frames."""
    return pipe(PROMPT, negative_prompt="", guidance_scale=cfg, num_inference_steps=steps, latents=noise.clone(),
                height=32, width=48, num_frames=5, max_sequence_length=8, output_type=output_type).frames


def _noise(seed=0):
    return torch.randn(1, 4, 2, 4, 6, generator=torch.Generator().manual_seed(seed))


def test_wan_samples_are_5d_video_latents(wan_pipeline_dir):
    """``C, F, H, W`` from ``num_frames`` and ``sample_size``, else WanPipeline's default video
    (81 frames of 480x832: 21 latent frames of 60x104)."""
    pipe = aq.load(wan_pipeline_dir)
    den = pipe.denoiser()
    assert den.media == "video" and den.sample_shape == (4, 2, 4, 6)
    x = pipe.sample(2, steps=2, progress=False)
    assert x.shape == (2, 4, 2, 4, 6) and torch.isfinite(x).all()
    pipe.defaults = aq.SamplingDefaults()
    assert pipe.denoiser().sample_shape == (4, 21, 60, 104)


def test_wan_samples_and_decodes_as_diffusers_does(wan_pipeline_dir):
    """Prompt encoding (UMT5, zero-padded), guidance against the empty prompt, the flow
    schedule of the UniPC config, the 3-D rotary embeddings, and the decoding through the
    latents' mean and deviation are diffusers' own."""
    ours = aq.load(wan_pipeline_dir)
    theirs = diffusers.WanPipeline.from_pretrained(str(wan_pipeline_dir))
    theirs.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    noise = _noise()
    with torch.no_grad():
        x = aq.run_trajectory(ours.denoiser(2.0), ours.solver(2), noise, ours.conditions(1, prompts=[PROMPT]))
    torch.testing.assert_close(x, _diffusers_video(theirs, noise, 2, 2.0), atol=1e-5, rtol=1e-4)
    frames = ours.decode_video(x)
    assert frames.shape == (1, 3, 5, 32, 48) and 0 <= frames.min() and frames.max() <= 1
    ref = _diffusers_video(theirs, noise, 2, 2.0, output_type="pt")  # (B, F, 3, H, W)
    torch.testing.assert_close(frames, ref.permute(0, 2, 1, 3, 4), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["naive", "per-step", "accuquant"])
def test_wan_quantizes_with_each_method_and_loads_back(wan_pipeline_dir, tmp_path, method):
    kw = {"per-step": {"iters": 2, "act_iters": 1, "samples_per_step": 2},
          "accuquant": {"iters": 2, "group_size": 2, "traj_batch": 2, "init_iters": 2, "init_act_iters": 1,
                        "init_samples": 2}}.get(method, {})
    q = aq.quantize(str(wan_pipeline_dir), W4A8, method, steps=3, calib_samples=2, progress=False, **kw)
    x = q.sample(2, steps=3, progress=False)
    assert x.shape == (2, 4, 2, 4, 6) and torch.isfinite(x).all()
    q.save(tmp_path / "q")
    back = aq.load(tmp_path / "q")
    assert torch.equal(back.sample(2, steps=3, progress=False), x)
    assert back.decode_video(x).shape == (2, 3, 5, 32, 48)


def test_wan_quantizes_its_attention_and_keeps_its_ends_fp(wan_pipeline_dir):
    """Self- and cross-attention get the quantized twin; the Conv3d patch embedding is not
    wrapped and the final projection is kept FP; the text encoder and VAE stay as they are."""
    q = aq.quantize(str(wan_pipeline_dir), W4A8, "naive", steps=2, calib_samples=2, progress=False)
    r = q.quant.report
    assert r.attention == [f"blocks.{b}.attn{a}" for b in (0, 1) for a in (1, 2)] and not r.attention_fp
    assert all(isinstance(q.model.get_submodule(n).processor, QuantWanAttnProcessor) for n in r.attention)
    assert r.kept_fp == ["proj_out"] and "patch_embedding" in r.other_fp
    assert isinstance(q.model.patch_embedding, torch.nn.Conv3d)
    assert "blocks.0.ffn.net.2" in r.quantized and "condition_embedder.text_embedder.linear_1" in r.quantized
    for comp in ("text_encoder", "vae"):
        assert not any(isinstance(m, QuantLayer) for m in q.components[comp].modules())


def test_a_quantized_wan_runs_in_diffusers_own_pipeline(wan_pipeline_dir):
    q = aq.quantize(str(wan_pipeline_dir), W4A8, "naive", steps=2, calib_samples=2, progress=False)
    pipe = q.to_diffusers()
    assert isinstance(pipe, diffusers.WanPipeline) and pipe.transformer is q.model
    noise = _noise(1)
    with torch.no_grad():
        x = aq.run_trajectory(q.denoiser(2.0), q.solver(2), noise, q.conditions(1, prompts=[PROMPT]))
    torch.testing.assert_close(x, _diffusers_video(pipe, noise, 2, 2.0), atol=1e-5, rtol=1e-4)


def test_accuquant_quantize_takes_a_video_model(wan_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "q"
    code = main(["quantize", "--model", str(wan_pipeline_dir), "--method", "naive", "--steps", "2",
                 "--calib-samples", "2", "--act-init", "minmax", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert aq.load(out).sample(1, progress=False).shape == (1, 4, 2, 4, 6)


def _wan_attention(**kw):
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

    torch.manual_seed(0)
    return WanAttention(dim=24, heads=2, dim_head=12, processor=WanAttnProcessor(), **kw).eval()


@torch.no_grad()
def test_the_wan_attention_twin_keeps_diffusers_arithmetic():
    """Without bits, self-attention with rotary embeddings and cross-attention compute what
    diffusers' ``WanAttnProcessor`` does; an image-to-video attention is refused in one line."""
    model = tiny_wan_transformer()
    rotary = model.rope(torch.zeros(1, 4, 2, 4, 6))
    x, ctx = torch.randn(2, 12, 24), torch.randn(2, 5, 24)
    for attn, args in ((_wan_attention(), (x, None, None, rotary)),
                       (_wan_attention(cross_attention_dim_head=12), (x, ctx, None, None))):
        ref = attn(*args)
        attn.set_processor(QuantWanAttnProcessor(None, None))
        torch.testing.assert_close(attn(*args), ref, atol=1e-6, rtol=1e-5)
    i2v = _wan_attention(cross_attention_dim_head=12, added_kv_proj_dim=24)
    i2v.set_processor(QuantWanAttnProcessor(8, 8))
    with pytest.raises(aq.AccuQuantError, match="image-to-video"):
        i2v(x, torch.randn(2, 520, 24), None, None)


def test_an_image_to_video_wan_is_refused():
    pipe = aq.Pipeline(tiny_wan_transformer(image_dim=16, added_kv_proj_dim=24), {})
    with pytest.raises(aq.AccuQuantError, match="image-to-video"):
        pipe.denoiser()


def test_image_outputs_of_a_video_model_are_refused(wan_pipeline_dir, monkeypatch):
    """Decoding to images and the image evaluation refuse a video model before sampling; an
    image model takes no frames."""
    from accuquant.eval.evaluation import evaluate
    from tests.conftest import ddim_config, tiny_unet

    pipe = aq.load(wan_pipeline_dir)
    with pytest.raises(aq.AccuQuantError, match=r"WanTransformer3DModel \(Wan 2.1\) is a video model"):
        pipe.decode(torch.zeros(1, 4, 2, 4, 6))
    monkeypatch.setattr(aq.Pipeline, "sample", lambda *a, **k: pytest.fail("sampled before refusing"))
    with pytest.raises(aq.AccuQuantError, match="is a video model"):
        evaluate(pipe, pipe, num=2, steps=2)
    with pytest.raises(aq.AccuQuantError, match="num_frames: UNet2DModel .* is an image model"):
        aq.Pipeline(tiny_unet(), ddim_config(), defaults=aq.SamplingDefaults(num_frames=3))
    with pytest.raises(aq.AccuQuantError, match="decode_video: UNet2DModel is an image model"):
        aq.Pipeline(tiny_unet(), ddim_config()).decode_video(torch.zeros(1, 1, 16, 16))
