"""The torchao export: a plain diffusers directory with the calibrated int8 weight codes."""

import pytest
import torch

import accuquant as aq
from accuquant.quant.layers import quant_layers

torchao = pytest.importorskip("torchao", reason="the torchao export needs torchao (pip install 'accuquant[export]')")


def _dit_w4(dit_pipeline_dir):
    return aq.quantize(str(dit_pipeline_dir), aq.QuantConfig(weight_bits=4, act_bits=8), "naive", steps=4,
                       calib_samples=4, progress=False)


def test_a_dit_exports_to_diffusers_and_loads_back_with_its_codes(dit_pipeline_dir, tmp_path):
    """Round trip: ``DiTPipeline.from_pretrained`` of the export, nothing but diffusers and
    torchao, holds every quantized Linear's codes and step sizes exactly (int8 on disk), and
    its transformer computes the weight-quantized network (activations in float) to float
    rounding; the pipeline samples."""
    import diffusers
    from safetensors import safe_open

    q = _dit_w4(dit_pipeline_dir)
    out = tmp_path / "exported"
    aq.save_torchao(q, out)
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    pipe = diffusers.DiTPipeline.from_pretrained(str(out), torch_dtype=torch.float32)
    t = pipe.transformer
    layers = quant_layers(q.model)
    assert layers
    for name, layer in layers.items():
        spec = layer.spec()
        w = t.get_submodule(name).weight
        z = spec.weight_grids[0].zero_point.reshape(-1, 1)
        assert torch.equal(w.qdata.to(torch.int32), spec.weight_codes.to(torch.int32) - z.to(torch.int32)), name
        assert torch.equal(w.dequantize(), spec.dequantized_weight()), name
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        dtypes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert sum(d == "I8" for d in dtypes.values()) == len(layers)

    # the reference: the same architecture with float weights equal to the dequantized codes
    ref = type(t).from_config(t.config).eval()
    ref.load_state_dict({k: v.dequantize() if hasattr(v, "dequantize") else v for k, v in t.state_dict().items()})
    g = torch.Generator().manual_seed(0)
    x, ts, labels = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.tensor([3, 1000])
    with torch.no_grad():
        a, b = t(x, ts, labels).sample, ref(x, ts, labels).sample
    assert ((a - b).norm() / b.norm()).item() < 1e-5
    img = pipe(class_labels=[1, 2], num_inference_steps=2, output_type="pt").images
    assert img.shape[0] == 2 and torch.isfinite(img).all()


def test_quantized_convolutions_are_refused(digit_pipeline_dir, tmp_path, capsys):
    from accuquant.cli import main

    q = aq.quantize(str(digit_pipeline_dir), aq.QuantConfig(weight_bits=4, act_bits=8), "naive", steps=4,
                    calib_samples=4, progress=False)
    with pytest.raises(aq.AccuQuantError, match="has no torchao form"):
        aq.save_torchao(q, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    q.save(tmp_path / "q")
    assert main(["export", "--model", str(tmp_path / "q"), "--out", str(tmp_path / "x")]) == 2
    assert "has no torchao form" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_command_line_exports(dit_pipeline_dir, tmp_path, capsys):
    from accuquant.cli import main

    _dit_w4(dit_pipeline_dir).save(tmp_path / "q")
    assert main(["export", "--model", str(tmp_path / "q"), "--out", str(tmp_path / "x")]) == 0
    assert "DiTPipeline.from_pretrained" in capsys.readouterr().out
    assert (tmp_path / "x" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
