"""EDA-DM: calibration points shared out by density and variety, layer terms in the loss."""

import torch

import accuquant as aq
from accuquant.methods.eda_dm import allocation, step_scores
from conftest import class_pipeline


def test_steps_are_scored_by_density_and_variety_as_the_selection_rule_says():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, 5, 5, generator=g)
    # steps 0-3 near one another (dense), step 4 far and pointing elsewhere (varied)
    feats = [base + 0.01 * k * torch.randn(4, 3, 5, 5, generator=g) for k in range(4)]
    feats.append(-3 * base)
    density, variety = step_scores(feats)
    assert density.min() == 0 and density.max() == 1 and variety.min() == 0 and variety.max() == 1
    assert int(density.argmin()) == 4 and int(variety.argmax()) == 4
    assert (density[:4] > 0.5).all()
    # a token sequence (B, N, D): channels are the last dim
    d2, v2 = step_scores([f.flatten(2).transpose(1, 2) for f in feats])
    assert torch.allclose(d2, density) and torch.allclose(v2, variety)


def test_points_are_shared_out_in_proportion_and_sum_to_the_total():
    assert allocation(torch.tensor([1.0, 1.0, 2.0]), 8) == [2, 2, 4]
    assert allocation(torch.tensor([1.0, 1.0, 1.0]), 10) == [4, 3, 3]  # the rounding's shortfall to the first
    assert allocation(torch.tensor([0.0, 0.0]), 5) == [3, 2]  # no information: even shares
    w = torch.tensor([0.1, 0.7, 0.2, 0.0])
    n = allocation(w, 100)
    assert sum(n) == 100 and n == [10, 70, 20, 0]


def test_eda_dm_calibrates_on_its_points_with_layer_terms():
    q = aq.quantize(class_pipeline(channels=(16, 32)), aq.QuantConfig(weight_bits=4, act_bits=8), "eda-dm",
                    steps=4, calib_samples=6, progress=False, iters=3, act_iters=1, samples_per_step=3,
                    feature_samples=4)
    log = q.quant.method_log
    assert q.quant.method == "eda-dm" and len(log["points_per_step"]) == 4
    assert sum(log["points_per_step"]) <= 12 and log["points"] == sum(log["points_per_step"])
    assert len(set(log["points_per_step"])) > 1  # not the even share per-step takes
    block = next(iter(log["blocks"].values()))
    assert block["loss"] >= 0 and block["rows"] > 0


def test_eda_dm_reads_the_features_of_a_block_called_by_keyword(sd3_pipeline_dir):
    q = aq.quantize(str(sd3_pipeline_dir), aq.QuantConfig(weight_bits=4, act_bits=8), "eda-dm", steps=3,
                    calib_samples=2, progress=False, iters=2, act_iters=1, samples_per_step=2, feature_samples=2)
    assert sum(q.quant.method_log["points_per_step"]) == 6
