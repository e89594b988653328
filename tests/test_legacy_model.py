"""A model saved by the release before the backend refactor loads and computes bit-identically."""

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import accuquant as aq
from accuquant.backends import FakeQuantLayer, LayerSpec
from accuquant.layers import QuantLayer, quant_layers
from accuquant.quantizers import UniformQuantizer

DATA = Path(__file__).parent / "data"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_legacy_model_loads_bit_identically(monkeypatch):
    ref = load_file(str(DATA / "legacy-w4a8-reference.safetensors"))
    with safe_open(str(DATA / "legacy-w4a8-reference.safetensors"), "pt") as f:
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
        traj = aq.run_trajectory(den, aq.make_scheduler(md["solver"], pipe.scheduler_config, int(md["steps"])),
                                 ref["noise"], cond)
    assert torch.equal(_bits(out), _bits(ref["out"]))
    assert torch.equal(_bits(traj), _bits(ref["trajectory"]))
