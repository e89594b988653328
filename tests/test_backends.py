"""Frozen layers run on a backend built from their description, bit-identically to the
computation they replace (which dequantized the weight codes on every forward)."""

import contextlib
from pathlib import Path

import pytest
import torch

import accuquant as aq
from accuquant.backends import base as backends
from accuquant.backends.base import BACKENDS, FakeQuantLayer, LayerSpec, build_layer, fake_quant_
from accuquant.quant.layers import QuantLayer, freeze_model, quant_layers
from accuquant.quant.quantizers import UniformQuantizer
from conftest import tiny_unet

LEGACY = Path(__file__).parent / "data" / "legacy-w4a8"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _wrapped_unet(cfg: aq.QuantConfig, seed: int = 0):
    """A tiny UNet wrapped with hand-set ranges (asymmetric activations with zero points)."""
    model = tiny_unet()
    aq.make_denoiser(model).wrap(cfg)
    g = torch.Generator().manual_seed(seed)
    weight_ids = set()
    for layer in quant_layers(model).values():
        for q, p in layer.weight_parts():
            q.init_range(p.detach(), "minmax")
            weight_ids.add(id(q))
    for q in model.modules():
        if isinstance(q, UniformQuantizer) and id(q) not in weight_ids:
            lo, hi = -3 * torch.rand((), generator=g), 1 + 3 * torch.rand((), generator=g)
            q.set_range(lo, hi)
    return model


@contextlib.contextmanager
def _without_kernels(layers):
    """The frozen layers' forward as it was: every layer dequantizes its codes on each
    call (the codes back in the layer, where the fake kernel held the only copy)."""
    kernels = [(layer.kernel, layer.codes_in_kernel) for layer in layers]
    for layer in layers:
        layer.weight_codes, layer.codes_in_kernel = layer.packed_codes(), False
        layer.kernel = None
    try:
        yield
    finally:
        for layer, (k, held) in zip(layers, kernels):
            layer.kernel = k
            if held:
                layer.weight_codes, layer.codes_in_kernel = None, True


def _legacy_forward(model, *args, **kwargs):
    with _without_kernels(list(quant_layers(model).values())), torch.no_grad():
        return model(*args, **kwargs).sample


def _no_dequantization(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("dequantized during a forward")

    monkeypatch.setattr(UniformQuantizer, "from_int", refuse)
    monkeypatch.setattr(LayerSpec, "dequantized_weight", refuse)
    monkeypatch.setattr(QuantLayer, "weight", property(refuse))


def test_frozen_model_runs_the_fake_backend_without_dequantizing(monkeypatch):
    model = _wrapped_unet(aq.QuantConfig(weight_bits=4, act_bits=8))
    keys_before = set(model.state_dict())
    freeze_model(model)
    layers = quant_layers(model)
    assert any(layer.split is not None for layer in layers.values())
    for layer in layers.values():
        assert isinstance(layer.kernel, FakeQuantLayer)
        assert layer.kernel.weight.dtype == torch.float32 and not isinstance(layer.kernel.weight, torch.nn.Parameter)
        assert torch.equal(layer.kernel.weight, layer.weight)  # dequantized once, as the old forward did
    # the state dict (what is saved) is the frozen layers' own: codes, no backend tensors
    keys = set(model.state_dict())
    assert not any(".kernel." in k for k in keys)
    assert keys == {k for k in keys_before if not k.endswith("module.weight")} | {
        f"{n}.weight_codes" for n in layers}
    x, labels = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 3, 4, 10])
    ref = _legacy_forward(model, x, 321, class_labels=labels)
    _no_dequantization(monkeypatch)
    with torch.no_grad():
        first = model(x, 321, class_labels=labels).sample
        second = model(x, 321, class_labels=labels).sample  # input layouts known: the shared workspace
    with torch.enable_grad():
        graded = model(x, 321, class_labels=labels).sample.detach()  # autograd on: no workspace
        layer = model.get_submodule("up_blocks.0.resnets.0.conv_shortcut")
        xs = torch.randn(2, layer.module.in_channels, 4, 4, requires_grad=True)
        layer(xs).sum().backward()
        assert xs.grad.abs().sum() > 0  # rounding passes gradients straight through, as calibration's
    with torch.inference_mode():
        inference = model(x, 321, class_labels=labels).sample.clone()
    with torch.no_grad():
        after = model(x, 321, class_labels=labels).sample  # the workspace is not an inference tensor here
    for out in (first, second, graded, inference, after):
        assert torch.equal(_bits(out), _bits(ref))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_split_layer_keeps_the_input_layout_of_the_old_computation(layout):
    """The split input's two quantized parts are concatenated as before, so the conv sees
    the same memory format (channels-last inputs take another conv algorithm)."""
    model = _wrapped_unet(aq.QuantConfig(weight_bits=4, act_bits=8))
    freeze_model(model)
    layer = model.get_submodule("up_blocks.0.resnets.0.conv_shortcut")
    assert layer.split == 64
    x = torch.randn(8, layer.module.in_channels, 8, 8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(8, layer.module.in_channels, 8, 12)[..., 2:10]
    with torch.no_grad():
        outs = [layer(x), layer(x)]
        with _without_kernels([layer]):
            ref = layer(x)
    for out in outs:
        assert out.stride() == ref.stride() and torch.equal(_bits(out), _bits(ref))


def test_activation_only_layers_keep_their_float_weight():
    model = _wrapped_unet(aq.QuantConfig(weight_bits=None, act_bits=8))
    freeze_model(model)
    layer = next(iter(quant_layers(model).values()))
    assert not layer.frozen and layer.kernel.weight.data_ptr() == layer.module.weight.data_ptr()
    x, labels = torch.randn(2, 1, 16, 16), torch.tensor([3, 10])
    with torch.no_grad():
        out = model(x, 50, class_labels=labels).sample
    assert torch.equal(_bits(out), _bits(_legacy_forward(model, x, 50, class_labels=labels)))


def test_spec_describes_a_split_layer():
    model = _wrapped_unet(aq.QuantConfig(weight_bits=4, act_bits=8))
    layer = model.get_submodule("up_blocks.0.resnets.0.conv_shortcut")
    layer.freeze()
    spec = layer.spec()
    assert spec.kind == "conv2d" and spec.split == 64 and spec.weight_bits == 4
    assert [g.bits for g in spec.input_grids] == [8, 8]
    assert len(spec.weight_grids) == 2 and len(spec.input_grids) == 2 and spec.bias is not None
    assert spec.weight_codes.dtype == torch.int16 and spec.weight_codes.shape == layer.codes_shape
    for g, c in zip(spec.weight_grids, spec.parts(spec.weight_codes, 1)):
        assert g.qmin <= int(c.min()) and int(c.max()) <= g.qmax and (g.qmin, g.qmax) == (0, 15)
    assert torch.equal(spec.dequantized_weight(), layer.weight)
    assert spec.stride == (1, 1) and spec.padding == (0, 0) and spec.groups == 1


@pytest.mark.parametrize("symmetric, zero_point", [(False, 0.0), (False, 37.0), (False, 255.0), (True, 0.0)])
def test_fake_quant_is_bit_identical_to_the_quantizer(symmetric, zero_point):
    q = UniformQuantizer(8, symmetric)
    q.scale.data.fill_(0.0371)
    q.zero_point.fill_(zero_point)
    s = q.scale.detach()
    x = torch.cat([torch.randn(10000) * 5, (torch.arange(-600, 600) + 0.5) * s,  # ties, grid edges
                   torch.tensor([0.0, -0.0, -1e-9, 1e-9, -0.4 * s.item(), 1e30, -1e30, float("inf"),
                                 -float("inf"), float("nan")])])
    with torch.no_grad():
        ref = q(x)
    z = q.zero_point.item()
    out = fake_quant_(x / s, s.item(), q.qmin - z, q.qmax - z)
    assert torch.equal(_bits(out), _bits(ref))  # also the sign of zeros and NaN


def test_unknown_backends_are_refused_with_the_choices():
    model = _wrapped_unet(aq.QuantConfig(weight_bits=4, act_bits=8))
    spec = next(iter(quant_layers(model).values())).spec()
    for call in (lambda: build_layer(spec, "int9"), lambda: freeze_model(model, "int9"),
                 lambda: aq.load(LEGACY, backend="int9"), lambda: aq.load_pipeline(LEGACY, backend="int9")):
        with pytest.raises(aq.AccuQuantError, match=r"unknown backend 'int9'; choices: .*fake") as e:
            call()
        assert "\n" not in str(e.value)


def test_a_backend_is_one_registration_and_is_chosen_at_load(monkeypatch):
    built = []

    class Counting(FakeQuantLayer):
        def __init__(self, spec):
            super().__init__(spec)
            built.append(spec.kind)

    monkeypatch.setitem(BACKENDS, "counting", Counting)
    assert aq.register_backend is backends.register_backend
    fake = aq.load(LEGACY)
    other = aq.load(LEGACY, backend="counting")
    layers = quant_layers(other.model)
    assert len(built) == len(layers) and all(isinstance(layer.kernel, Counting) for layer in layers.values())
    x, labels = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        a = fake.model(x, 10, class_labels=labels).sample
        b = other.model(x, 10, class_labels=labels).sample
    assert torch.equal(_bits(a), _bits(b))
    freeze_model(fake.model, "counting")  # a frozen model moves to another backend the same way
    assert all(isinstance(layer.kernel, Counting) for layer in quant_layers(fake.model).values())
