"""TFMQ-DM's temporal reconstruction: the temporal path matches FP better than per-step's."""

import pytest
import torch

import accuquant as aq
from conftest import class_pipeline, tiny_dit


def _outputs(model, names, den, x, t, cond) -> dict:
    """The outputs of the modules ``names`` of ``model`` in one call of ``den``."""
    outs, modules = {}, dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o.detach()))
               for n in names]
    with torch.no_grad():
        den(x, t, cond)
    for h in handles:
        h.remove()
    return outs


def _dit():
    return aq.Pipeline(tiny_dit(), class_pipeline().scheduler_config, defaults=aq.SamplingDefaults(1.0, 9))


@pytest.mark.parametrize("make,temporal_iters", [
    (_dit, 300),
    pytest.param(lambda: class_pipeline(channels=(16, 32)), 100, marks=pytest.mark.slow),
], ids=["dit", "unet"])
def test_the_temporal_path_matches_fp_more_closely_than_per_step_s(make, temporal_iters):
    fp = make()
    opts = dict(steps=3, calib_samples=4, progress=False, iters=15, act_iters=5, samples_per_step=4)
    cfg = aq.QuantConfig(weight_bits=3, act_bits=8)
    per_step = aq.quantize(fp, cfg, "per-step", **opts)
    tfmq = aq.quantize(fp, cfg, "tfmq", temporal_iters=temporal_iters, **opts)
    names = tfmq.quant.method_log["temporal_layers"]
    assert names and all("emb" in n or "norm1.linear" in n for n in names)
    # other timesteps and conditions than calibration's
    den = fp.denoiser()
    x = torch.randn(6, *den.sample_shape, generator=torch.Generator().manual_seed(5))
    cond = fp.conditions(6)
    err = {}
    for t in (950, 500, 40):
        ref = _outputs(fp.model, names, den, x, t, cond)
        for name, q in (("per-step", per_step), ("tfmq", tfmq)):
            out = _outputs(q.model, names, q.denoiser(), x, t, cond)
            err[name] = err.get(name, 0.0) + sum(float((out[n] - ref[n]).pow(2).mean()) for n in names)
    assert err["tfmq"] < 0.9 * err["per-step"], err


def test_tfmq_is_per_step_where_the_temporal_path_is_not_quantized():
    fp = class_pipeline(channels=(16, 32))
    cfg = aq.QuantConfig(weight_bits=4, act_bits=8, keep_fp=("conv_in", "conv_out", "time_embedding.*",
                                                             "*.time_emb_proj"))
    q = aq.quantize(fp, cfg, "tfmq", steps=3, calib_samples=4, progress=False, iters=2, act_iters=1,
                    temporal_iters=2, samples_per_step=2)
    assert q.quant.method == "tfmq" and q.quant.method_log["temporal_layers"] == []
    assert "temporal_error" not in q.quant.method_log
