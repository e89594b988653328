"""Weight codes packed in memory: the ``packed`` backend (fake's arithmetic, two 4-bit codes
per byte, dequantized per layer just in time) and the ``fake`` backend that holds the only
copy of the weight."""

import pytest
import torch

import accuquant as aq
from accuquant.backends.placement import resident_bytes
from accuquant.quant.layers import freeze_model, quant_layers
from accuquant.quant.packing import pack_codes, packed_numel, unpack_codes
from conftest import class_pipeline


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_codes_pack_and_unpack_exactly(bits):
    codes = torch.randint(0, 2**bits, (7, 5, 3), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (packed_numel(bits, codes.shape),)
    assert packed.numel() == -(-codes.numel() // {2: 4, 3: 2, 4: 2, 5: 1, 8: 1}[bits])
    assert torch.equal(unpack_codes(packed, bits, codes.shape), codes)


def _quantized(bits: int = 4, **kw):
    cfg = aq.QuantConfig(weight_bits=bits, act_bits=8, **kw)
    return aq.quantize(class_pipeline(), cfg, "naive", steps=3, calib_samples=2, progress=False)


def _call(q, seed: int = 1) -> torch.Tensor:
    den = q.denoiser(2.0)
    x = torch.randn(3, *den.sample_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return den(x, torch.tensor(300), q.conditions(3))


def _weight_bytes(model) -> int:
    """Bytes of the layers' weights as held: codes or float weights, without scales."""
    total = 0
    for layer in quant_layers(model).values():
        k = layer.kernel
        held = getattr(k, "packed_codes", None) if getattr(k, "weight", None) is None else k.weight
        if layer.weight_codes is not None:
            held = layer.weight_codes
        total += held.numel() * held.element_size()
    return total


def test_packed_backend_is_bit_identical_to_fake_and_holds_an_eighth():
    q = _quantized(4)
    ref = _call(q)
    codes = {n: layer.int_codes().clone() for n, layer in quant_layers(q.model).items()}
    fake_bytes, fp_bytes = _weight_bytes(q.model), 4 * sum(c.numel() for c in codes.values())
    assert fake_bytes == fp_bytes  # the fake kernel's float weight is the only copy
    freeze_model(q.model, "packed")
    layers = quant_layers(q.model).values()
    assert all(layer.kernel.runs_on == "packed" and layer.weight_codes is None for layer in layers)
    assert _weight_bytes(q.model) == sum(-(-c.numel() // 2) for c in codes.values())  # two codes per byte
    assert torch.equal(_call(q), ref)
    for name, layer in quant_layers(q.model).items():  # the codes come back exactly from either kernel
        assert torch.equal(layer.int_codes(), codes[name]), name
    freeze_model(q.model, "fake")
    assert torch.equal(_call(q), ref)


def test_fake_model_holds_no_more_than_its_float_base():
    fp = class_pipeline()
    q = _quantized(8)
    assert resident_bytes(q.model) <= 1.01 * resident_bytes(fp.model)  # plus the quantizers' scalars
    assert all(layer.codes_in_kernel for layer in quant_layers(q.model).values())


def test_packed_model_saves_and_loads_bit_identically(tmp_path):
    q = _quantized(3, weight_group=16)
    freeze_model(q.model, "packed")
    ref = _call(q)
    state = q.model.state_dict()
    out = tmp_path / "q"
    q.save(out)
    for backend in ("packed", "fake"):
        loaded = aq.load(out, backend=backend)
        assert torch.equal(_call(loaded), ref), backend
        for key, t in loaded.model.state_dict().items():
            assert torch.equal(t, state[key]), key
