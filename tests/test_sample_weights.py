"""Gradient-aligned weighting of AccuQuant's groups."""

import torch

import accuquant as aq
from accuquant.methods.accuquant import AccuQuantConfig, alignment_weights
from conftest import class_pipeline


def test_a_group_pulling_against_the_others_gets_no_weight():
    g = torch.tensor([1.0, 2.0, -1.0])
    w = alignment_weights(torch.stack([g, 2 * g, -g]))
    assert torch.allclose(w, torch.tensor([1.5, 1.5, 0.0]))
    w = alignment_weights(torch.eye(3)[:2])  # orthogonal, the same length: alike
    assert torch.allclose(w, torch.ones(2))
    w = alignment_weights(torch.stack([g, g + torch.tensor([0.0, 0.0, 3.0])]))  # the one nearer the mean: more
    assert torch.allclose(w.mean(), torch.tensor(1.0)) and w[1] > w[0]
    assert torch.equal(alignment_weights(torch.stack([g, -g])), torch.ones(2))  # no agreement: uniform


def test_the_option_leaves_default_configs_and_their_keys_as_they_were():
    assert "sample_weights" not in AccuQuantConfig().to_dict()
    cfg = AccuQuantConfig(sample_weights="gradient-aligned")
    assert cfg.to_dict()["sample_weights"] == "gradient-aligned"
    assert AccuQuantConfig.from_dict(cfg.to_dict()) == cfg
    assert AccuQuantConfig.from_dict(AccuQuantConfig().to_dict()) == AccuQuantConfig()


def test_accuquant_calibrates_with_gradient_aligned_weights():
    opts = dict(steps=4, calib_samples=4, progress=False, init="naive", iters=6, group_size=2, batch_size=2,
                save_every=3)
    q = aq.quantize(class_pipeline(channels=(16, 32)), aq.QuantConfig(weight_bits=4, act_bits=8), "accuquant",
                    sample_weights="gradient-aligned", **opts)
    w = q.quant.method_log["group_weights"]
    assert list(w) == ["0", "3"] and all(len(v) == 2 for v in w.values())
    assert all(abs(sum(v) / 2 - 1) < 1e-3 for v in w.values())
