"""Mixed precision: per-layer widths, the sensitivity measure, the exact allocation, and
the widths saved with the model."""

import itertools
import random

import pytest
import torch

import accuquant as aq
from accuquant.calibrate.mixed import _quantized_input, allocate
from accuquant.quant.layers import quant_layers
from conftest import text_pipeline_and_calibration, text_conditions


def test_the_allocation_is_the_best_under_the_budget():
    rng = random.Random(0)
    for trial in range(20):
        names = [f"l{i}" for i in range(5)]
        params = {n: rng.randint(10, 1000) for n in names}
        sens = {}
        for n in names:  # lower widths hurt more
            s4 = rng.random()
            s6 = s4 * rng.random()
            sens[n] = {4: s4, 6: s6, 8: s6 * rng.random()}
        avg = rng.uniform(4.0, 6.5)
        got = allocate(sens, params, avg)
        total = sum(params.values())
        assert sum(params[n] * b for n, b in got.items()) <= avg * total + 1e-9
        best = min((sum(sens[n][b] for n, b in zip(names, bits)), bits)
                   for bits in itertools.product((4, 6, 8), repeat=5)
                   if sum(params[n] * b for n, b in zip(names, bits)) <= avg * total)
        # exact up to rounding each cost up to 1/4000 of the span: never above the budget, rarely worse
        assert sum(sens[n][b] for n, b in got.items()) <= best[0] * 1.02 + 1e-12, trial
    assert set(allocate(sens, params, 4.0).values()) == {4}
    assert set(allocate(sens, params, 8.0).values()) == {8}


def test_per_layer_widths_apply_validate_and_round_trip():
    cfg = aq.QuantConfig(weight_bits=4, layer_bits={"a.b": [8, 8], "c": [6, None]})
    assert aq.QuantConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(aq.AccuQuantError, match="layer_bits"):
        aq.QuantConfig(layer_bits={"a": [9, 8]})
    with pytest.raises(aq.AccuQuantError, match="between weight_bits"):
        aq.QuantConfig(weight_bits=4, mixed_precision=3.5)


def test_a_mixed_precision_model_calibrates_saves_and_loads_bit_identically(tmp_path):
    fp, calib = text_pipeline_and_calibration(4, 4)
    cfg = aq.QuantConfig(weight_bits=4, act_bits=8, mixed_precision=5.0, weight_init="minmax", act_init="minmax")
    q = aq.quantize(fp, cfg, "naive", calib=calib, steps=4, progress=False)
    info = q.quant.method_log["mixed_precision"]
    layers = quant_layers(q.model)
    widths = {n: lyr.weight_quant[0].bits for n, lyr in layers.items()}
    params = {n: lyr.module.weight.numel() if hasattr(lyr.module, "weight") else 0 for n, lyr in layers.items()}
    sens = info["sensitivity"]
    assert set(widths.values()) > {4} and info["average_weight_bits"] <= 5.0
    assert q.quant.config.layer_bits == {n: [b, 8] for n, b in widths.items() if b != 4}
    # the measure: a layer at 4 bits costs more than at 8, over the model
    assert sum(s["4"] for s in sens.values()) > sum(s["8"] for s in sens.values())
    # the most sensitive layer (per parameter) got more than the lowest width
    top = max(sens, key=lambda n: (sens[n]["4"] - sens[n]["8"]))
    assert widths[top] > 4
    _saved_and_loaded_alike(q, tmp_path, lambda lyr: lyr.weight_quant[0].bits, widths)
    del params


def _saved_and_loaded_alike(q, tmp_path, width, widths):
    """``q`` saves and loads with the same per-layer ``width(layer)`` and the same output, bit for bit."""
    q.save(tmp_path / "q")
    back = aq.load(tmp_path / "q")
    assert {n: width(lyr) for n, lyr in quant_layers(back.model).items()} == widths
    x, cond = torch.randn(2, 4, 8, 8), text_conditions(2, seed=9)
    with torch.no_grad():
        assert torch.equal(q.denoiser()(x, 700, cond), back.denoiser()(x, 700, cond))


def test_activation_widths_are_allocated_by_the_same_measure_and_saved(tmp_path):
    fp, calib = text_pipeline_and_calibration(4, 4)
    cfg = aq.QuantConfig(weight_bits=8, act_bits=4, act_granularity="token", act_mixed_precision=6.0,
                         weight_init="minmax", act_init="minmax")
    q = aq.quantize(fp, cfg, "naive", calib=calib, steps=4, progress=False)
    info = q.quant.method_log["mixed_precision"]
    assert "average_weight_bits" not in info and info["act_budget"] == 6.0
    widths = {n: lyr.input_quant[0].bits for n, lyr in quant_layers(q.model).items()}
    sens = info["act_sensitivity"]
    assert set(widths.values()) > {4} and 4.0 < info["average_act_bits"] <= 6.0
    assert {lyr.weight_quant[0].bits for lyr in quant_layers(q.model).values()} == {8}
    assert q.quant.config.layer_bits == {n: [8, b] for n, b in widths.items() if b != 4}
    assert sum(s["4"] for s in sens.values()) > sum(s["8"] for s in sens.values())
    top = max(sens, key=lambda n: sens[n]["4"] - sens[n]["8"])
    assert widths[top] > 4
    _saved_and_loaded_alike(q, tmp_path, lambda lyr: lyr.input_quant[0].bits, widths)
    with pytest.raises(aq.AccuQuantError, match="between act_bits"):
        aq.QuantConfig(act_bits=None, act_mixed_precision=6.0)


def test_a_split_layer_s_input_is_measured_with_a_grid_per_part():
    """The activation sensitivity quantizes a shortcut-split conv's two input parts on their
    own grids, as the quantized layer does: a small-range part is not crushed by a large one."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(2, 4, 3, 3) * 0.01, torch.randn(2, 4, 3, 3) * 100], dim=1)
    cfg = aq.QuantConfig(weight_bits=4, act_bits=4, act_granularity="token")
    split = _quantized_input(4, cfg, conv=True, split=4)(None, (x,))[0]
    joint = _quantized_input(4, cfg, conv=True)(None, (x,))[0]
    small = lambda y: (y[:, :4] - x[:, :4]).abs().max().item()  # noqa: E731
    assert small(split) < 0.01 * 0.2 and small(joint) > 10 * small(split)
    torch.testing.assert_close(split[:, 4:], _quantized_input(4, cfg, conv=True)(None, (x[:, 4:],))[0])

