import json

import pytest

from accuquant import ConfigError, QuantConfig


def test_defaults_and_json_round_trip():
    cfg = QuantConfig(weight_bits=4, act_bits=6, keep_fp=["conv_in"], weight_symmetric=True, softmax_bits=8)
    back = QuantConfig.from_json(cfg.to_json())
    assert back == cfg
    d = json.loads(cfg.to_json())
    assert d["format_version"] == 1 and d["keep_fp"] == ["conv_in"] and d["weight_bits"] == 4
    assert QuantConfig().weight_granularity == "channel" and QuantConfig().act_granularity == "tensor"
    # keep_fp None: the model family's defaults (a UNet's first and last convolutions)
    from accuquant.models import adapter_class

    assert QuantConfig().keep_fp is None and QuantConfig.from_json(QuantConfig().to_json()) == QuantConfig()
    assert adapter_class("UNet2DModel").keep_fp == ("conv_in", "conv_out")


@pytest.mark.parametrize("bits", [16, 32, None])
def test_float_bits_mean_not_quantized(bits):
    cfg = QuantConfig(weight_bits=bits, act_bits=bits)
    assert cfg.weight_bits is None and cfg.act_bits is None
    assert cfg.resolved_attn_bits is None and cfg.resolved_softmax_bits is None


def test_attention_bits_follow_act_bits_unless_set():
    assert QuantConfig(act_bits=6).resolved_attn_bits == 6
    assert QuantConfig(act_bits=6, softmax_bits=8).resolved_softmax_bits == 8
    assert QuantConfig(act_bits=6, attn_bits=None).resolved_attn_bits is None


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"weight_bits": 1}, "weight_bits"),
        ({"weight_bits": 9}, "weight_bits"),
        ({"act_bits": 12}, "act_bits"),
        ({"act_bits": 4.5}, "act_bits"),
        ({"attn_bits": 0}, "attn_bits"),
        ({"softmax_bits": "x"}, "softmax_bits"),
        ({"weight_granularity": "row"}, "weight_granularity"),
        ({"act_granularity": "channel"}, "act_granularity"),
        ({"weight_symmetric": "yes"}, "weight_symmetric"),
        ({"keep_fp": "conv_in"}, "keep_fp"),
        ({"weight_init": "magic"}, "weight_init"),
        ({"percentile": 20}, "percentile"),
        ({"format_version": 99}, "format_version"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        QuantConfig(**kwargs)
    assert str(e.value).startswith(field)


def test_unknown_field_and_bad_json_are_refused():
    with pytest.raises(ConfigError, match="bogus"):
        QuantConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="JSON"):
        QuantConfig.from_json("{nope")
