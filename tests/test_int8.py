"""The int8 backend: each layer against the fake backend, fallbacks, and the command line."""

import pytest
import torch

import accuquant as aq
from accuquant.backends.base import build_layer
from accuquant.backends.placement import placement
from accuquant.backends.int8 import available, vnni
from accuquant.eval.speed import bf16_hardware
from accuquant.quant.layers import quant_layers
from conftest import class_pipeline

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no oneDNN int8 kernels")


def _layer_outputs(q, guidance):
    """Every quantized layer's input and fake output during one guided denoiser call."""
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o, n=name: seen.append((n, m, i[0], o)))
             for name, layer in quant_layers(q.model).items()]
    den = q.denoiser(guidance)
    x = torch.randn(3, *den.sample_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        den(x, torch.tensor(400), q.conditions(3))
    for h in hooks:
        h.remove()
    return seen


def layers_on(backend: str, act_symmetric: bool):
    """W4A8 naive on a guided class-conditional UNet: per quantized layer, ``(name, spec,
    input, fake output, output of the layer built on backend, relative error)``; every
    layer must run on ``backend`` and keep its output shape."""
    cfg = aq.QuantConfig(weight_bits=4, act_bits=8, act_symmetric=act_symmetric)
    q = aq.quantize(class_pipeline(), cfg, "naive", steps=4, calib_samples=4, progress=False)
    for name, layer, x, ref in _layer_outputs(q, guidance=2.0):
        spec = layer.spec()
        k = build_layer(spec, backend)
        assert k.runs_on == backend, (name, getattr(k, "why", ""))
        with torch.no_grad():
            y = k(x)
        assert y.shape == ref.shape, name
        yield name, spec, x, ref, y, ((y - ref).norm() / ref.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("act_symmetric", [False, True])
def test_every_layer_matches_the_fake_backend(act_symmetric):
    """W4A8 on a class-conditional UNet with guidance (both branches in one batch): every
    layer kind (Linear on vectors and on tokens, 3x3 and 1x1 and strided convs, shortcut-split
    convs), with asymmetric and symmetric activation grids, runs on the int8 kernels and
    gives the fake backend's output to a relative error of 1e-5."""
    kinds = set()
    for name, spec, x, ref, y, err in layers_on("int8", act_symmetric):
        assert err < 1e-5, (name, err)
        kinds.add((spec.kind, spec.split is not None, x.dim(), tuple(spec.stride)[:1], spec.weight_codes.dim() == 4
                   and spec.weight_codes.shape[-1] == 1))
    assert {k[0] for k in kinds} == {"linear", "conv2d"}
    assert any(k[1] for k in kinds), "no shortcut-split conv"
    assert any(k[0] == "linear" and k[2] == 3 for k in kinds), "no Linear on tokens"
    assert any(k[3] == (2,) for k in kinds) and any(k[4] for k in kinds), "no strided or 1x1 conv"


def test_layers_the_kernels_cannot_run_stay_on_fake_with_the_reason(tmp_path):
    """Asymmetric 8-bit weights fold to codes beyond int8, and activations left in float
    (``act_bits=16``) have no codes: those layers stay on fake, and the placement names why."""
    q = aq.quantize(class_pipeline(), aq.QuantConfig(weight_bits=8, act_bits=8), "naive", steps=4, calib_samples=4,
                    progress=False)
    q.save(tmp_path / "w8")
    where = placement(aq.load(tmp_path / "w8", backend="int8").model)
    assert "int8" not in where and all("weight codes up to" in n for n in where["fake"])
    q = aq.quantize(class_pipeline(), aq.QuantConfig(weight_bits=4, act_bits=16), "naive", steps=4, calib_samples=4,
                    progress=False)
    q.save(tmp_path / "a16")
    where = placement(aq.load(tmp_path / "a16", backend="int8").model)
    assert all("float activations" in n for n in where["fake"])


def test_loaded_int8_model_samples_close_to_fake(tmp_path, capsys):
    """A saved W4A8 model loaded on int8 and on fake: the same samples up to the input codes
    that float rounding moves across a grid boundary. This random-weight model turns such
    a flip into a visible change (a 1e-7 change of its input moves a guided output by 0.4%),
    hence the loose bound; the bundled trained model's figure is in the README."""
    from accuquant.cli import main
    from accuquant.eval.metrics import psnr

    q = aq.quantize(class_pipeline(), aq.QuantConfig(weight_bits=4, act_bits=8), "naive", steps=4, calib_samples=4,
                    progress=False)
    q.save(tmp_path / "q")
    a = aq.load(tmp_path / "q").sample(4, steps=4, progress=False)
    loaded = aq.load(tmp_path / "q", backend="int8")
    from accuquant.quant.attention import QuantAttnProcessor
    procs = [m for m in loaded.model.modules() if isinstance(m, QuantAttnProcessor)]
    assert procs and all(m.backend == "int8" for m in procs)  # the attention follows the layers' backend
    b = loaded.sample(4, steps=4, progress=False)
    p = psnr((a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2).clamp(max=99).mean()
    assert p > 25
    assert main(["sample", "--model", str(tmp_path / "q"), "--backend", "int8", "--num", "2", "--steps", "2",
                 "--out", str(tmp_path / "g.png"), "--quiet"]) == 0
    assert "backend int8: " in capsys.readouterr().out and (tmp_path / "g.png").is_file()


def test_speed_times_every_variant_in_one_run(digit_pipeline_dir, tmp_path, capsys):
    import json

    from accuquant.cli import main

    q = aq.quantize(str(digit_pipeline_dir), aq.QuantConfig(weight_bits=4, act_bits=8), "naive", steps=4, calib_samples=4,
                    progress=False)
    q.save(tmp_path / "q")
    capsys.readouterr()
    assert main(["speed", "--model", str(tmp_path / "q"), "--repeats", "2", "--steps", "2", "--threads", "1",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    # no --backend: every backend this machine runs on the CPU (not cuda-int8)
    # (bf16 autocast only where the CPU computes in bf16; elsewhere the results say why not)
    floats = {"fp32", "bf16"} if bf16_hardware() else {"fp32"}
    assert set(r["variants"]) == floats | {"w4a8-fake", "w4a8-packed", "w4a8-int8"}
    assert ("bf16" in r.get("skipped", {})) != bf16_hardware()
    assert r["guided"] and r["threads"] == 1
    for v in r["variants"].values():
        assert 0 < v["call"]["min_ms"] <= v["call"]["median_ms"] <= v["call"]["max_ms"]
        assert v["sample"]["median_ms"] > v["call"]["median_ms"]  # two steps cost more than one call
    n = r["placement"]["fake"]["fake"]
    assert r["variants"]["fp32"]["call_speedup"] == 1.0 and r["placement"]["int8"] == {"int8": n}
    w = {k: v["weights_vs_fp32"] for k, v in r["variants"].items()}
    assert w["fp32"] == w.get("bf16", 1.0) == 1.0 and w["w4a8-packed"] < w["w4a8-int8"] < 0.5 < w["w4a8-fake"] <= 1.02


def test_int8_model_holds_its_quantized_weights_in_a_quarter_of_fp32(tmp_path):
    """Loaded on int8, a W4A8 model keeps only the prepacked int8 weights of its quantized
    layers (one byte per weight, no codes or float copies beside them): those layers hold
    at most 0.3x the bytes of their float32 weights; saving or moving such a model is refused
    with a clear error, since it keeps no other copy."""
    from accuquant.errors import AccuQuantError
    from accuquant.backends.placement import resident_bytes

    base = class_pipeline()
    fp = {n: resident_bytes(m) for n, m in base.model.named_modules()}
    q = aq.quantize(base, aq.QuantConfig(weight_bits=4, act_bits=8), "naive", steps=4, calib_samples=4, progress=False)
    q.save(tmp_path / "q")
    fake, int8 = aq.load(tmp_path / "q"), aq.load(tmp_path / "q", backend="int8")
    layers = quant_layers(int8.model)
    assert layers and all(layer.kernel.runs_on == "int8" for layer in layers.values())
    ref = sum(fp[n] for n in layers)  # float32 weight and bias of the same layers
    held = sum(resident_bytes(layer) for layer in layers.values())
    held_fake = sum(resident_bytes(layer) for layer in quant_layers(fake.model).values())
    assert held <= 0.3 * ref < held_fake, (held, held_fake, ref)
    assert resident_bytes(int8.model) < resident_bytes(fake.model)
    with pytest.raises(AccuQuantError, match="only in its int8 kernels"):
        int8.save(tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_an_int8_dit_runs_inside_diffusers_own_pipeline(dit_pipeline_dir, tmp_path):
    """``aq.load(..., backend="int8").to_diffusers()``: diffusers' DiTPipeline calls the
    quantized transformer, its Linear layers on the int8 kernels, and its images are the
    fake backend's up to input codes that float rounding moves."""
    q = aq.quantize(str(dit_pipeline_dir), aq.QuantConfig(weight_bits=4, act_bits=8), "naive", steps=4,
                    calib_samples=4, progress=False)
    q.save(tmp_path / "q")
    images = {}
    for backend in ("fake", "int8"):
        loaded = aq.load(tmp_path / "q", backend=backend)
        if backend == "int8":
            assert len(placement(loaded.model).get("int8", [])) > 0
        pipe = loaded.to_diffusers()
        images[backend] = pipe(class_labels=[1, 2], num_inference_steps=4, output_type="pt",
                               generator=torch.Generator().manual_seed(0)).images
    a, b = images["fake"], images["int8"]
    assert torch.isfinite(b).all() and ((a - b).norm() / a.norm()).item() < 0.05


@pytest.mark.parametrize("int8_values", [True, False])
def test_attention_off_fake_matches_fake_to_float_rounding(monkeypatch, int8_values):
    """Off the fake backend, attention at inference takes the blocked path (one reused
    buffer, softmax in place, the probabilities' codes times V before their step size),
    with ``softmax . V`` on the int8 kernels (or, for few keys, in float): on every
    attention call of a guided denoiser step, in several blocks, it gives the fake path's
    output to a relative error of 1e-6."""
    from accuquant.quant import attention

    q = aq.quantize(class_pipeline(), aq.QuantConfig(weight_bits=4, act_bits=8), "naive", steps=4, calib_samples=4,
                    progress=False)
    calls, attend = [], attention.QuantAttnProcessor.attend

    def record(self, attn, *args):
        calls.append((self, attn, [a.clone() if torch.is_tensor(a) else a for a in args]))
        return attend(self, attn, *args)

    monkeypatch.setattr(attention.QuantAttnProcessor, "attend", record)
    den = q.denoiser(2.0)
    with torch.no_grad():
        den(torch.randn(3, *den.sample_shape, generator=torch.Generator().manual_seed(1)), torch.tensor(400),
            q.conditions(3))
    assert calls and all(isinstance(p.probs_quant, attention.UniformQuantizer) for p, _, _ in calls)
    blocks = []
    for name in ("_attend_fast", "_attend_int8"):
        f = getattr(attention.QuantAttnProcessor, name)
        monkeypatch.setattr(attention.QuantAttnProcessor, name,
                            lambda self, *a, f=f, name=name: blocks.append(name) or f(self, *a))
    for proc, attn, args in calls:
        outs = {}
        for backend in ("fake", "int8"):
            proc.backend = backend
            n_q, n_k = args[1].shape[-2], args[2].shape[-2]
            with monkeypatch.context() as m:
                if backend == "int8":  # blocks of 16 query rows
                    m.setattr(attention, "CHUNK", args[1][..., 0, 0].numel() * 16 * n_k)
                    m.setattr(attention, "INT8_BLOCK", 16 * n_k)
                    m.setattr(attention, "INT8_MIN_KEYS", 1 if int8_values else n_k + 1)
                    assert n_q > 16
                with torch.no_grad():
                    outs[backend] = attend(proc, attn, *[a.clone() if torch.is_tensor(a) else a for a in args])
        proc.backend = "fake"
        ref, y = outs["fake"], outs["int8"]
        err = ((y - ref).norm() / ref.norm()).item()
        assert y.shape == ref.shape and err < 1e-6, err
    assert blocks.count("_attend_fast") == len(calls)
    if int8_values and vnni():  # without VNNI, V's 8-bit integers may span more than the kernels sum exactly
        assert blocks.count("_attend_int8") == len(calls)
    elif not int8_values:
        assert blocks.count("_attend_int8") == 0
