import diffusers
import pytest
import torch

import accuquant as aq
from accuquant.quant.layers import QuantLayer
from conftest import tiny_unet


def test_quantize_accepts_a_diffusers_pipeline_a_model_and_a_path(tiny_pipeline_dir):
    pipe = diffusers.DDPMPipeline.from_pretrained(str(tiny_pipeline_dir))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    q1 = aq.quantize(pipe, aq.QuantConfig(weight_bits=4), "naive", steps=3, calib_samples=2,
                     progress=False)
    q2 = aq.quantize(pipe.unet, aq.QuantConfig(weight_bits=4), "naive", steps=3, calib_samples=2,
                     progress=False)
    q3 = aq.quantize(str(tiny_pipeline_dir), aq.QuantConfig(weight_bits=4), "naive", steps=3, calib_samples=2,
                     progress=False)
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
        aq.quantize(model, method="naive", steps=2, calib_samples=2, progress=False)
    with pytest.raises(aq.AccuQuantError, match="unknown method"):
        aq.quantize(tiny_unet(), method="nope")
    with pytest.raises(aq.AccuQuantError, match="cannot quantize"):
        aq.quantize(42)
    q = aq.quantize(tiny_unet(num_class_embeds=None), method="naive", steps=2, calib_samples=2, progress=False)
    with pytest.raises(aq.AccuQuantError, match="already quantized"):
        aq.quantize(q, method="naive", steps=2, calib_samples=2, progress=False)


def test_calibration_for_other_steps_is_refused():
    pipe = aq.Pipeline(tiny_unet(num_class_embeds=None), dict(diffusers.DDIMScheduler().config))
    calib = aq.collect_trajectories(pipe.denoiser(), aq.make_solver("ddim", pipe.scheduler_config, 4), 2,
                                    progress=False)
    with pytest.raises(aq.AccuQuantError, match="do not match"):
        aq.quantize(pipe, method="naive", calib=calib, steps=5, progress=False)


def test_the_api_s_defaults_are_the_command_line_s(monkeypatch, tmp_path):
    """``aq.quantize(model)`` and ``accuquant quantize --model M`` with no other option run
    the same calibration: AccuQuant at W4A8 with the same steps, data, batch and memory."""
    import accuquant.api
    from accuquant.cli import main

    seen = []

    def prepare(source, config, mconfig, calib=None, **kw):
        seen.append((config, mconfig, calib, kw))
        raise aq.AccuQuantError("stop here")

    monkeypatch.setattr(accuquant.api, "prepare", prepare)
    with pytest.raises(aq.AccuQuantError, match="stop here"):
        aq.quantize(tiny_unet())
    assert main(["quantize", "--model", "bundled:mnist-ddpm", "--out", str(tmp_path / "q"), "--quiet"]) == 2
    (api_cfg, api_method, api_calib, api_kw), (cli_cfg, cli_method, cli_calib, cli_kw) = seen
    assert api_cfg == cli_cfg == aq.QuantConfig(weight_bits=4, act_bits=8)
    assert api_method == cli_method and api_method.NAME == "accuquant" and api_method.is_default()
    assert api_calib is cli_calib is None
    from accuquant.config import parse_size

    ignore = {"progress", "inplace"}  # the command line quantizes the model it loaded, and draws bars on stderr
    a, c = ({k: parse_size(v) if k == "max_memory" else v for k, v in kw.items() if k not in ignore}
            for kw in (api_kw, cli_kw))
    assert a == c and a["steps"] == 20 and a["calib_samples"] == 64
