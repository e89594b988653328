"""The cuda-int8 backend (``torch._int_mm`` Linear, bfloat16 conv on codes), checked on
the CPU, where ``torch._int_mm`` runs the same code; its speed on a GPU is not measured here."""

import pytest
import torch

import accuquant as aq
from accuquant.backends.placement import placement, resident_bytes
from accuquant.quant.layers import quant_layers
from conftest import class_pipeline
from test_int8 import layers_on

pytestmark = pytest.mark.skipif(not hasattr(torch, "_int_mm"), reason="this torch build has no torch._int_mm")


@pytest.mark.parametrize("act_symmetric", [False, True])
def test_every_layer_matches_the_fake_backend(act_symmetric):
    """W4A8, guided: Linear layers (few rows and token rows, padded to _int_mm's sizes) give
    fake's output to 1e-5 relative; convs (3x3, 1x1, strided, shortcut-split), summed in
    float32 but returned in bfloat16, to 4e-3."""
    kinds = set()
    for name, spec, x, ref, y, err in layers_on("cuda-int8", act_symmetric):
        assert err < (1e-5 if spec.kind == "linear" else 4e-3), (name, err)
        kinds.add((spec.kind, spec.split is not None, x.reshape(-1, x.shape[-1]).shape[0] < 17))
    assert {k[0] for k in kinds} == {"linear", "conv2d"}
    assert any(k[1] for k in kinds), "no shortcut-split conv"
    assert ("linear", False, True) in kinds, "no Linear with fewer rows than _int_mm takes"


def test_loaded_model_runs_on_cuda_int8_in_a_third_of_fp32(tmp_path):
    """Saved and loaded on cuda-int8: every layer on it, weights held as int8 (with their
    per-channel scales, padding and sums: at most 0.3x the float32 weights of the same
    layers), 4-step samples close to fake's (a random-weight model: see the int8 test),
    and saving refused since the kernels hold the only copy."""
    from accuquant.errors import AccuQuantError
    from accuquant.eval.metrics import psnr

    base = class_pipeline()
    fp = {n: resident_bytes(m) for n, m in base.model.named_modules()}
    q = aq.quantize(base, aq.QuantConfig(weight_bits=4, act_bits=8), "naive", steps=4, calib_samples=4,
                    progress=False)
    q.save(tmp_path / "m")
    fake, fast = aq.load(tmp_path / "m"), aq.load(tmp_path / "m", backend="cuda-int8")
    assert list(placement(fast.model)) == ["cuda-int8"]
    layers = quant_layers(fast.model)
    held = sum(resident_bytes(layer) for layer in layers.values())
    assert held < 0.3 * sum(fp[n] for n in layers), (held, sum(fp[n] for n in layers))
    a = fake.sample(4, steps=4, seed=0, progress=False)
    b = fast.sample(4, steps=4, seed=0, progress=False)
    p = psnr((a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2).clamp(max=99).mean().item()
    assert p > 25, p
    with pytest.raises(AccuQuantError, match="only in its cuda-int8 kernels"):
        fast.save(tmp_path / "again")
