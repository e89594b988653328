"""The torchao export: a plain diffusers directory with the calibrated int8 weight codes."""

import pytest
import torch

import accuquant as aq
from accuquant.quant.layers import quant_layers

torchao = pytest.importorskip("torchao", reason="the torchao export needs torchao (pip install 'accuquant[export]')")


def _dit_w4(dit_pipeline_dir, **kw):
    return aq.quantize(str(dit_pipeline_dir), aq.QuantConfig(weight_bits=4, act_bits=8, **kw), "naive", steps=4,
                       calib_samples=4, progress=False)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.tensor([3, 1000])


def _check_codes(t, layers):
    for name, layer in layers.items():
        spec = layer.spec()
        w = t.get_submodule(name).weight
        z = spec.weight_grids[0].zero_point.reshape(-1, 1)
        assert torch.equal(w.qdata.to(torch.int32), spec.weight_codes.to(torch.int32) - z.to(torch.int32)), name
        assert torch.equal(w.dequantize(), spec.dequantized_weight()), name


def test_a_dit_exports_w4a8_with_static_activations_and_computes_the_calibrated_network(dit_pipeline_dir, tmp_path):
    """Round trip of the default export: ``DiTPipeline.from_pretrained`` of it, nothing but
    diffusers and torchao, holds every quantized Linear's codes and step sizes exactly (int8
    on disk) and its calibrated 8-bit input grid (zero point moved by 128 onto torchao's
    [-128, 127]); with the attention matmuls unquantized (the part torchao cannot express),
    its transformer computes the quantized model (``fake`` backend) to float rounding; the
    pipeline samples."""
    import diffusers
    from safetensors import safe_open

    q = _dit_w4(dit_pipeline_dir, attn_bits=None, softmax_bits=None)
    out = tmp_path / "exported"
    aq.save_torchao(q, out)
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    pipe = diffusers.DiTPipeline.from_pretrained(str(out), torch_dtype=torch.float32)
    t = pipe.transformer
    layers = quant_layers(q.model)
    assert layers
    _check_codes(t, layers)
    for name, layer in layers.items():
        (a,) = layer.spec().input_grids
        w = t.get_submodule(name).weight
        assert w.act_quant_scale.numel() == 1 and w.act_quant_scale.item() == a.scale.item(), name
        assert w.act_quant_zero_point.item() == a.zero_point.item() - 128, name
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        dtypes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert sum(d == "I8" for d in dtypes.values()) == 2 * len(layers)  # codes and activation zero points

    x, ts, labels = _inputs()
    with torch.no_grad():
        a, b = t(x, ts, labels).sample, q.model(x, ts, labels).sample
    assert ((a - b).norm() / b.norm()).item() < 1e-5
    img = pipe(class_labels=[1, 2], num_inference_steps=2, output_type="pt").images
    assert img.shape[0] == 2 and torch.isfinite(img).all()


def test_the_weights_only_export_computes_the_weight_quantized_network(dit_pipeline_dir, tmp_path):
    """``activations="float"``: the same codes, no activation quantization: the export equals
    the architecture with float weights equal to the dequantized codes, to float rounding,
    and is further from the W4A8 model than the static export is."""
    import diffusers

    q = _dit_w4(dit_pipeline_dir, attn_bits=None, softmax_bits=None)
    aq.save_torchao(q, tmp_path / "float", activations="float")
    aq.save_torchao(q, tmp_path / "static")
    t = diffusers.DiTPipeline.from_pretrained(str(tmp_path / "float"), torch_dtype=torch.float32).transformer
    static = diffusers.DiTPipeline.from_pretrained(str(tmp_path / "static"), torch_dtype=torch.float32).transformer
    _check_codes(t, quant_layers(q.model))
    assert all(t.get_submodule(n).weight.act_quant_kwargs is None for n in quant_layers(q.model))
    ref = type(t).from_config(t.config).eval()
    ref.load_state_dict({k: v.dequantize() if hasattr(v, "dequantize") else v for k, v in t.state_dict().items()})
    x, ts, labels = _inputs()
    with torch.no_grad():
        a, b, fake, s = (m(x, ts, labels).sample for m in (t, ref, q.model, static))
    assert ((a - b).norm() / b.norm()).item() < 1e-5
    assert (s - fake).norm() * 100 < (a - fake).norm()


def _refused(q, tmp_path, capsys, match: str) -> str:
    """``q``'s export refused by the API (``match``) and by the command line (exit status 2),
    nothing written either way; the command line's message."""
    from accuquant.cli import main

    with pytest.raises(aq.AccuQuantError, match=match):
        aq.save_torchao(q, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    q.save(tmp_path / "q")
    assert main(["export", "--model", str(tmp_path / "q"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    return capsys.readouterr().err.strip()


def test_inputs_torchao_cannot_quantize_statically_are_refused_unless_weights_only(dit_pipeline_dir, tmp_path,
                                                                                 capsys):
    """A 4-bit input grid has no torchao static form: the static export says so (the command
    line: one line, exit status 2, nothing written) and names the way out; the weights-only
    export of the same model works."""
    q = aq.quantize(str(dit_pipeline_dir), aq.QuantConfig(weight_bits=4, act_bits=4), "naive", steps=4,
                    calib_samples=4, progress=False)
    err = _refused(q, tmp_path, capsys, "4 bits.*activations='float'")
    assert "--activations float" in err and len(err.splitlines()) == 1
    aq.save_torchao(q, tmp_path / "x", activations="float")
    assert (tmp_path / "x" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def test_quantized_convolutions_are_refused(digit_pipeline_dir, tmp_path, capsys):
    q = aq.quantize(str(digit_pipeline_dir), aq.QuantConfig(weight_bits=4, act_bits=8), "naive", steps=4,
                    calib_samples=4, progress=False)
    assert "has no torchao form" in _refused(q, tmp_path, capsys, "has no torchao form")


def test_the_command_line_exports(dit_pipeline_dir, tmp_path, capsys):
    from accuquant.cli import main

    import json

    _dit_w4(dit_pipeline_dir).save(tmp_path / "q")
    for act, kind in (("static", "Int8StaticActivationInt8WeightConfig"), ("float", "Int8WeightOnlyConfig")):
        out = tmp_path / act
        assert main(["export", "--model", str(tmp_path / "q"), "--out", str(out), "--activations", act]) == 0
        assert "DiTPipeline.from_pretrained" in capsys.readouterr().out
        assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
        config = json.loads((out / "transformer" / "config.json").read_text())["quantization_config"]
        assert kind in json.dumps(config)


def test_an_sd3_exports_with_static_activations_and_samples(sd3_pipeline_dir, tmp_path):
    """An MMDiT (joint attention, text and image streams): every quantized Linear, whatever
    the rank of its input (pooled embeddings 2-D, tokens 3-D), gets its static grid; the
    export computes the quantized transformer to float rounding and the plain
    ``StableDiffusion3Pipeline`` samples."""
    import diffusers

    q = aq.quantize(str(sd3_pipeline_dir), aq.QuantConfig(weight_bits=4, act_bits=8, attn_bits=None,
                                                          softmax_bits=None), "naive", steps=4, calib_samples=4,
                    progress=False)
    aq.save_torchao(q, tmp_path / "x")
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "x"), torch_dtype=torch.float32,
                                                              text_encoder_3=None, tokenizer_3=None)  # no T5 here
    t = pipe.transformer
    layers = quant_layers(q.model)
    ranks = {t.get_submodule(n).weight.act_quant_scale.dim() for n in layers}
    assert ranks == {2, 3}
    g = torch.Generator().manual_seed(0)
    x, ts = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 20.0])
    text, pooled = torch.randn(2, 5, 16, generator=g), torch.randn(2, 16, generator=g)
    with torch.no_grad():
        a = t(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=ts).sample
        b = q.model(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=ts).sample
    assert ((a - b).norm() / b.norm()).item() < 1e-5
    img = pipe(prompt=["a one", "a seven"], num_inference_steps=2, output_type="pt").images
    assert img.shape[0] == 2 and torch.isfinite(img).all()
