"""A model saved by the release before the backend refactor loads and computes bit-identically."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import accuquant as aq
from accuquant.backends.base import FakeQuantLayer, LayerSpec
from accuquant.quant.layers import QuantLayer, quant_layers
from accuquant.quant.quantizers import UniformQuantizer

DATA = Path(__file__).parent / "data"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _reference() -> Path:
    """The old release's outputs computed on a CPU with this one's vector instructions (float
    sums, and on this random model the input codes they move, depend on them)."""
    cap = torch.backends.cpu.get_cpu_capability()
    path = DATA / ("legacy-w4a8-reference.safetensors" if cap == "AVX2" else f"legacy-w4a8-reference-{cap}.safetensors")
    if not path.is_file():
        pytest.skip(f"no reference computed by the old release on a {cap} CPU (tests/data/make_legacy_model.py)")
    return path


def test_legacy_model_loads_bit_identically(monkeypatch):
    path = _reference()
    ref = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    threads = torch.get_num_threads()
    torch.set_num_threads(int(md["threads"]))  # the reference's: float sums depend on the thread count
    try:
        _check(monkeypatch, ref, md)
    finally:
        torch.set_num_threads(threads)


def _check(monkeypatch, ref, md):
    pipe = aq.load(DATA / "legacy-w4a8", backend="fake")
    layers = quant_layers(pipe.model)
    assert any(layer.split is not None for layer in layers.values()) and pipe.quant["report"]["attention"]
    assert all(isinstance(layer.kernel, FakeQuantLayer) for layer in layers.values())
    den = pipe.denoiser()

    def refuse(*a, **k):
        raise AssertionError("dequantized during a forward")

    for cls, name in ((UniformQuantizer, "from_int"), (LayerSpec, "dequantized_weight")):
        monkeypatch.setattr(cls, name, refuse)
    monkeypatch.setattr(QuantLayer, "weight", property(refuse))
    cond = aq.Conditions(labels=ref["labels"])
    with torch.no_grad():
        out = den(ref["x"], int(md["timestep"]), cond)
        traj = aq.run_trajectory(den, aq.make_solver(md["solver"], pipe.scheduler_config, int(md["steps"])),
                                 ref["noise"], cond)
    assert torch.equal(_bits(out), _bits(ref["out"]))
    assert torch.equal(_bits(traj), _bits(ref["trajectory"]))
