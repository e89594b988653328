import pytest
import torch
from torch import nn

import accuquant as aq
from accuquant.models import shortcut_splits
from accuquant.quant.attention import QuantAttnProcessor
from accuquant.quant.layers import QuantLayer, quant_layers, wrap_model
from conftest import class_pipeline, text_conditions, tiny_cond_unet, tiny_dit, tiny_unet


def _linear_like(model):
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}


def test_every_conv_and_linear_of_a_unet2d_is_wrapped():
    model = tiny_unet()
    before = _linear_like(model)
    report = aq.make_denoiser(model).wrap(aq.QuantConfig(weight_bits=8))
    assert sorted(report.quantized + report.kept_fp) == sorted(before)
    assert report.kept_fp == ["conv_in", "conv_out"]
    layers = quant_layers(model)
    assert set(layers) == set(report.quantized)
    # attention blocks use the quantizing processor
    assert report.attention and all(
        isinstance(model.get_submodule(n).processor, QuantAttnProcessor) for n in report.attention
    )
    assert "class_embedding" in report.other_fp


def test_every_conv_and_linear_of_a_text_unet_is_wrapped():
    model = tiny_cond_unet()
    before = _linear_like(model)
    report = aq.make_denoiser(model).wrap(aq.QuantConfig(weight_bits=4))
    assert sorted(report.quantized + report.kept_fp) == sorted(before)
    assert any("attn2.to_k" in n for n in report.quantized)  # cross-attention projections
    assert len(report.attention) == sum(1 for n in before if n.endswith("to_q"))


def test_wrapping_keeps_one_copy_of_the_weights():
    model = tiny_unet()
    w = model.down_blocks[0].resnets[0].conv1.weight
    aq.make_denoiser(model).wrap(aq.QuantConfig(weight_bits=8))
    layer = model.down_blocks[0].resnets[0].conv1
    assert isinstance(layer, QuantLayer) and layer.module.weight is w
    layer.freeze()
    assert "weight" not in dict(layer.module.named_parameters())
    # the fake kernel's dequantized weight is the only copy; the codes come back from it exactly
    assert layer.weight_codes is None and layer.codes_in_kernel and layer.weight.shape == w.shape
    assert layer.state_dict()["weight_codes"].dtype == torch.uint8
    # the backend module holds the dequantized weight, outside the state dict
    assert layer.kernel.weight.shape == w.shape and "kernel.weight" not in layer.state_dict()


def test_shortcut_splits_follow_the_concatenation():
    model = tiny_unet(channels=(32, 64))
    splits = shortcut_splits(model)
    # up block 0 (64 ch) concatenates mid-block features (64) with skips
    assert splits["up_blocks.0.resnets.0.conv_shortcut"] == 64
    assert splits["up_blocks.1.resnets.1.conv_shortcut"] == 32
    for name, split in splits.items():
        assert model.get_submodule(name).in_channels > split
    wrap_model(model, aq.QuantConfig(weight_bits=8), splits)
    layer = model.get_submodule("up_blocks.0.resnets.0.conv_shortcut")
    assert len(layer.input_quant) == 2 and len(layer.weight_quant) == 2
    # two parts with very different scales get their own ranges
    x = torch.cat([torch.randn(2, 64, 4, 4), 50 * torch.randn(2, layer.module.in_channels - 64, 4, 4)], 1)
    for q, part in zip(layer.input_quant, layer._parts(x, 1)):
        q.init_range(part, "minmax")
    s0, s1 = (q.scale.item() for q in layer.input_quant)
    assert s1 > 10 * s0


def test_quant_attention_processor_matches_diffusers_when_not_quantizing():
    model = tiny_unet()
    attn = model.mid_block.attentions[0]
    x = torch.randn(2, 64, 4, 4)
    ref = attn(x)
    attn.set_processor(QuantAttnProcessor(None, None))
    assert torch.allclose(attn(x), ref, atol=1e-5)
    attn.set_processor(QuantAttnProcessor(4, 4))
    for q in attn.processor.quantizers().values():
        q.set_range(torch.tensor(-3.0), torch.tensor(3.0))
    assert not torch.allclose(attn(x), ref, atol=1e-3)


def _rel_err(pipe_fp, pipe_q, seed=1):
    den_fp, den_q = pipe_fp.denoiser(), pipe_q.denoiser()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 1, 16, 16, generator=g)
    cond = aq.Conditions(labels=torch.arange(8) % 10)
    with torch.no_grad():
        ref = den_fp(x, 500, cond)
        out = den_q(x, 500, cond)
    return ((out - ref).norm() / ref.norm()).item()


def test_w8a8_naive_is_close_and_w2_is_further():
    fp = class_pipeline()
    errs = {}
    for w, a in ((8, 8), (4, 8), (2, 8)):
        q = aq.quantize(fp, aq.QuantConfig(weight_bits=w, act_bits=a), "naive", steps=5, calib_samples=8, progress=False)
        errs[w] = _rel_err(fp, q)
    assert errs[8] < 0.05
    assert errs[8] < errs[4] < errs[2]


def test_dit_transformer_is_quantized_and_samples():
    model = tiny_dit()
    pipe = aq.Pipeline(model, dict(__import__("diffusers").DDIMScheduler().config), defaults=aq.SamplingDefaults(1.5))
    q = aq.quantize(pipe, aq.QuantConfig(weight_bits=8, act_bits=8), "naive", steps=4, calib_samples=4, progress=False)
    assert "pos_embed.proj" in q.quant.report.kept_fp
    assert len(q.quant.report.attention) == 2
    a = pipe.sample(2, steps=4, progress=False)
    b = q.sample(2, steps=4, progress=False)
    assert a.shape == (2, 4, 8, 8) and torch.isfinite(b).all()
    assert (a - b).norm() / a.norm() < 0.2


def test_text_unet_quantizes_with_prompt_embeddings():
    fp = aq.Pipeline(tiny_cond_unet(), dict(__import__("diffusers").DDIMScheduler().config),
                     defaults=aq.SamplingDefaults(3.0))
    den = fp.denoiser()
    solver = aq.make_solver("ddim", fp.scheduler_config, 4)
    calib = aq.collect_trajectories(den, solver, 4, cond=text_conditions(4), progress=False)
    q = aq.quantize(fp, aq.QuantConfig(weight_bits=8, act_bits=8), "naive", calib=calib, steps=4, progress=False)
    x = torch.randn(2, 4, 8, 8)
    cond = text_conditions(2, seed=5)
    with torch.no_grad():
        ref, out = fp.denoiser()(x, 500, cond), q.denoiser()(x, 500, cond)
    assert ((out - ref).norm() / ref.norm()).item() < 0.1


def test_custom_attention_processors_are_left_alone():
    from diffusers.models.attention_processor import AttnProcessor

    class MyProcessor(AttnProcessor):
        pass

    model = tiny_unet()
    model.mid_block.attentions[0].set_processor(MyProcessor())
    report = aq.make_denoiser(model).wrap(aq.QuantConfig(weight_bits=8))
    assert report.attention_fp == ["mid_block.attentions.0"]
    assert isinstance(model.mid_block.attentions[0].processor, MyProcessor)
    assert "mid_block.attentions.0" not in report.attention and report.attention


def test_float64_and_mixed_precision_models_are_refused():
    with pytest.raises(aq.AccuQuantError, match="expected one of float32, float16, bfloat16"):
        aq.quantize(tiny_unet().double(), method="naive", steps=2, calib_samples=2, progress=False)
    mixed = tiny_unet()
    mixed.conv_out.half()
    with pytest.raises(aq.AccuQuantError, match="expected one of"):
        aq.quantize(mixed, method="naive", steps=2, calib_samples=2, progress=False)


def test_large_attention_at_inference_is_computed_by_row_blocks_bit_identically(monkeypatch):
    """Above ``CHUNK`` score elements, inference computes attention a block of query rows at a
    time: the same output bit for bit as the whole score matrix (and as with gradients on),
    with quantized Q, K, V and probabilities; while ranges are observed, whole calls only."""
    import types

    import accuquant.quant.attention as attention

    proc = QuantAttnProcessor(8, 8)
    with torch.no_grad():
        for q in proc.quantizers().values():
            q.scale.fill_(0.05)
            q.zero_point.fill_(128)
        proc.probs_quant.scale.fill_(1 / 255)
        proc.probs_quant.zero_point.fill_(0)
    attn = types.SimpleNamespace(upcast_attention=False, upcast_softmax=False)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 50, 8, generator=g) for _ in range(3))
    with torch.no_grad():
        whole = proc.attend(attn, q.clone(), k.clone(), v.clone(), None, 8 ** -0.5)
        calls = []
        real = proc._scores_to_output
        monkeypatch.setattr(proc, "_scores_to_output", lambda *a: calls.append(a[1].shape[-2]) or real(*a))
        monkeypatch.setattr(attention, "CHUNK", 4 * 7 * 50)  # blocks of 7 query rows
        blocks = proc.attend(attn, q.clone(), k.clone(), v.clone(), None, 8 ** -0.5)
    assert calls == [7] * 7 + [1] and torch.equal(blocks, whole)
    with torch.enable_grad():
        assert torch.equal(proc.attend(attn, q.clone(), k.clone(), v.clone(), None, 8 ** -0.5).detach(), whole)
