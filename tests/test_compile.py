"""A denoiser compiled by torch.compile (Inductor, weights frozen as constants), on the
``fake`` and ``int8`` backends: the same model to float rounding, and timed apart by
``speed --compile``."""

import json

import pytest
import torch

import accuquant as aq
from accuquant.backends.int8 import available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not available(), reason="no oneDNN int8 kernels in this torch")]


def test_compiled_models_compute_the_eager_ones_and_speed_times_them(dit_pipeline_dir, tmp_path, capsys):
    """Attention matmuls quantized too: compiled on ``fake`` and on ``int8``, the model equals
    the eager one to 5e-3 (float rounding in Inductor's fused softmax moves a few 8-bit
    probability codes), its layers still on their backend and the module the same object;
    then ``speed --compile`` times float32 and int8 compiled, with the compile time."""
    from accuquant.cli import main
    from accuquant.quant.layers import quant_layers

    q = aq.quantize(str(dit_pipeline_dir), aq.QuantConfig(weight_bits=4, act_bits=8), "naive", steps=4,
                    calib_samples=4, progress=False)
    q.save(tmp_path / "q")
    for backend in ("fake", "int8"):
        p = aq.load(tmp_path / "q", backend=backend)
        den = p.denoiser()
        x = torch.randn(4, *den.sample_shape, generator=torch.Generator().manual_seed(0))
        cond, t = p.conditions(4), p.solver().timesteps[1]
        with torch.inference_mode():
            eager = den(x, t, cond)
            model = p.model
            p.compile()
            compiled = den(x, t, cond)
        assert p.model is model
        assert all(layer.kernel.runs_on == backend for layer in quant_layers(p.model).values())
        assert ((compiled - eager).norm() / eager.norm()).item() < 5e-3, backend

    assert main(["speed", "--model", str(tmp_path / "q"), "--backend", "int8", "--compile", "--batch", "1",
                 "--steps", "2", "--repeats", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    v = r["variants"]
    assert {"fp32", "fp32+compile", "w4a8-int8", "w4a8-int8+compile"} <= set(v)
    assert v["w4a8-int8+compile"]["compile_s"] > 0 and v["fp32+compile"]["compile_s"] > 0
