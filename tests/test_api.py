import diffusers
import pytest
import torch

import accuquant as aq
from accuquant.quant.layers import QuantLayer
from conftest import tiny_unet


def test_quantize_accepts_a_diffusers_pipeline_a_model_and_a_path(tiny_pipeline_dir):
    pipe = diffusers.DDPMPipeline.from_pretrained(str(tiny_pipeline_dir))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    q1 = aq.quantize(pipe, aq.QuantConfig(weight_bits=4), steps=3, calib_samples=2, progress=False)
    q2 = aq.quantize(pipe.unet, aq.QuantConfig(weight_bits=4), steps=3, calib_samples=2, progress=False)
    q3 = aq.quantize(str(tiny_pipeline_dir), aq.QuantConfig(weight_bits=4), steps=3, calib_samples=2, progress=False)
    # the source is left untouched
    assert not any(isinstance(m, QuantLayer) for m in pipe.unet.modules())
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items())
    # the pipeline's own scheduler config is used (DDPM here), and all three agree
    assert q1.scheduler_config["_class_name"] == "DDPMScheduler" == q3.scheduler_config["_class_name"]
    a, c = (q.sample(2, steps=3, progress=False) for q in (q1, q3))
    assert torch.equal(a, c)
    assert q2.sample(2, steps=3, progress=False).shape == a.shape


def test_quantize_refuses_bad_input():
    model = tiny_unet(num_class_embeds=None)
    with torch.no_grad():
        model.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(aq.AccuQuantError, match="NaN or inf"):
        aq.quantize(model, steps=2, calib_samples=2, progress=False)
    with pytest.raises(aq.AccuQuantError, match="unknown method"):
        aq.quantize(tiny_unet(), method="nope")
    with pytest.raises(aq.AccuQuantError, match="cannot quantize"):
        aq.quantize(42)
    q = aq.quantize(tiny_unet(num_class_embeds=None), steps=2, calib_samples=2, progress=False)
    with pytest.raises(aq.AccuQuantError, match="already quantized"):
        aq.quantize(q, steps=2, calib_samples=2, progress=False)


def test_calibration_for_other_steps_is_refused():
    pipe = aq.Pipeline(tiny_unet(num_class_embeds=None), dict(diffusers.DDIMScheduler().config))
    calib = aq.collect_trajectories(pipe.denoiser(), aq.make_solver("ddim", pipe.scheduler_config, 4), 2,
                                    progress=False)
    with pytest.raises(aq.AccuQuantError, match="do not match"):
        aq.quantize(pipe, calib=calib, steps=5, progress=False)
