"""Weights per group of inputs and activations per token: the grids, exactness on the fake
backend, the integer backends' fallback, and save/load."""

import pytest
import torch
from torch import nn

import accuquant as aq
from accuquant.quant.layers import QuantLayer, quant_layers
from accuquant.quant.quantizers import TokenQuantizer, UniformQuantizer, grouped, token_quant
from conftest import text_pipeline_and_calibration, text_conditions


def test_a_group_as_wide_as_the_channel_is_the_per_channel_quantizer():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    per_channel = UniformQuantizer(4, False, (8, 1, 1, 1), axis=0)
    per_group = UniformQuantizer(4, False, (8, 1, 1), axis=0, group=36)
    for q in (per_channel, per_group):
        q.init_range(w, "mse")
    assert torch.equal(per_channel.scale.flatten(), per_group.scale.flatten())
    assert torch.equal(per_channel(w), per_group(w))
    assert torch.equal(per_channel.to_int(w), per_group.to_int(w))


def test_each_group_has_its_own_grid():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    w[:, :16] *= 50  # one loud group per row: per channel it would flatten the others
    q = UniformQuantizer(4, False, (4, 4, 1), axis=0, group=16)
    q.init_range(w, "minmax")
    wq = q(w)
    err = grouped(wq - w, 16).abs().amax(-1)
    s = q.scale.squeeze(-1)
    assert torch.all(err <= s / 2 + 1e-6)
    assert s[:, 0].min() > 20 * s[:, 1:].max()  # the loud group's step only
    for row in grouped(wq, 16).flatten(0, 1):
        assert row.unique().numel() <= 16
    codes = q.to_int(w)
    assert codes.shape == w.shape and torch.equal(q.from_int(codes), wq)
    per_channel = UniformQuantizer(4, False, (4, 1), axis=0)
    per_channel.init_range(w, "minmax")
    quiet = (per_channel(w) - w)[:, 16:].pow(2).mean(), (wq - w)[:, 16:].pow(2).mean()
    assert quiet[0] > 100 * quiet[1]  # the quiet groups keep their resolution


def test_per_token_ranges_and_the_clipping_factor_s_gradient():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 32) * torch.logspace(-2, 2, 10)[None, :, None]  # tokens of very different sizes
    q = TokenQuantizer(4, False, dim=-1)
    y = q(x)
    step = (x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)) / 15
    assert torch.all((y - x).abs() <= step / 2 + 1e-6)  # min-max per token: no clipping, half a step
    for row in y.reshape(-1, 32):
        assert row.unique().numel() <= 16
    static = UniformQuantizer(4, False)
    static.init_range(x, "minmax")
    quiet = (static(x) - x)[:, :5].pow(2).mean(), (y - x)[:, :5].pow(2).mean()
    assert quiet[0] > 100 * quiet[1]  # small tokens keep their resolution
    sym = token_quant(x, torch.tensor(1.0), -7, 7, True, -1)
    assert torch.all((sym - x).abs() <= x.abs().amax(-1, keepdim=True) / 14 + 1e-6)
    # conv inputs: a token is a pixel, its features the channels
    xc = torch.randn(2, 8, 5, 5)
    assert torch.equal(TokenQuantizer(8, False, dim=1)(xc), TokenQuantizer(8, False, dim=-1)(
        xc.movedim(1, -1)).movedim(-1, 1))
    # the clipping factor learns: its gradient is the step size's
    q.scale.data.fill_(0.8)
    loss = (q(x) - x).pow(2).sum()
    loss.backward()
    assert q.scale.grad is not None and q.scale.grad.abs() > 0


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_grouped_per_token_layer_is_exact_on_the_fake_backend(kind):
    torch.manual_seed(0)
    module = nn.Linear(128, 16) if kind == "linear" else nn.Conv2d(32, 8, 3, padding=1)
    x = torch.randn(2, 5, 128) if kind == "linear" else torch.randn(2, 32, 6, 6)
    cfg = aq.QuantConfig(weight_bits=4, act_bits=4, weight_group=32, act_granularity="token")
    layer = QuantLayer(module, cfg)
    q, part = layer.weight_parts()[0]
    assert q.group == 32 and q.scale.shape == (module.weight.shape[0], module.weight[0].numel() // 32, 1)
    q.init_range(part, "mse")
    with torch.no_grad():
        ref = layer(x)
        layer.freeze("fake")
        assert torch.equal(layer(x), ref)
        assert layer.spec().weight_grids[0].group == 32 and layer.spec().input_grids[0].per_token
        layer.freeze("int8")  # no integer kernel takes either: the fake layer, with the reason
        assert layer.kernel.runs_on == "fake" and "per group" in layer.kernel.why
        assert torch.equal(layer(x), ref)


def test_layers_whose_inputs_the_group_does_not_divide_keep_one_range_per_channel():
    cfg = aq.QuantConfig(weight_bits=4, weight_group=64)
    assert QuantLayer(nn.Conv2d(3, 8, 3), cfg).weight_quant[0].group is None  # 27 inputs
    assert QuantLayer(nn.Linear(64, 8), cfg).weight_quant[0].group is None  # one group: per channel
    assert QuantLayer(nn.Linear(192, 8), cfg).weight_quant[0].group == 64


def test_the_options_validate_and_round_trip():
    cfg = aq.QuantConfig(weight_group=64, act_granularity="token")
    assert aq.QuantConfig.from_json(cfg.to_json()) == cfg
    assert aq.QuantConfig(weight_group="none").weight_group is None
    assert aq.QuantConfig(weight_group="32").weight_group == 32
    with pytest.raises(aq.AccuQuantError, match="group size"):
        aq.QuantConfig(weight_group=1)
    with pytest.raises(aq.AccuQuantError, match="weight_granularity"):
        aq.QuantConfig(weight_group=64, weight_granularity="tensor")
    with pytest.raises(aq.AccuQuantError, match="per channel is refused"):
        aq.QuantConfig(act_granularity="channel")


def test_a_text_model_with_groups_and_tokens_calibrates_saves_and_loads_bit_identically(tmp_path):
    fp, calib = text_pipeline_and_calibration(3, 2)
    cfg = aq.QuantConfig(weight_bits=4, act_bits=4, weight_group=16, act_granularity="token")
    x, cond = torch.randn(2, 4, 8, 8), text_conditions(2, seed=9)
    outs = {}
    for method in ("naive", "per-step"):
        opts = {"iters": 4, "act_iters": 2, "samples_per_step": 2} if method == "per-step" else {}
        q = aq.quantize(fp, cfg, method, calib=calib, steps=3, progress=False, **opts)
        layers = quant_layers(q.model)
        assert any(lyr.weight_quant[0].group == 16 for lyr in layers.values())
        assert all(isinstance(lyr.input_quant[0], TokenQuantizer) for lyr in layers.values())
        q.save(tmp_path / method)
        back = aq.load(tmp_path / method)
        with torch.no_grad():
            outs[method] = q.denoiser()(x, 700, cond)
            assert torch.equal(outs[method], back.denoiser()(x, 700, cond))
        assert back.quant.config.weight_group == 16 and back.quant.config.act_granularity == "token"
    with torch.no_grad():
        fp_out = fp.denoiser()(x, 700, cond)
    assert torch.isfinite(outs["per-step"]).all()
    assert (outs["per-step"] - fp_out).pow(2).mean() < (fp_out.pow(2).mean())
