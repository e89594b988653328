import json
import os
from pathlib import Path

import diffusers
import pytest
import torch

import accuquant as aq
from accuquant.io.save import FORMAT, QUANT_FILE, WEIGHTS_FILE
from accuquant.quant.packing import pack_codes, unpack_codes
from conftest import text_pipeline_and_calibration, class_pipeline, text_conditions, tiny_unet


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (7, 5, 3), generator=torch.Generator().manual_seed(bits), dtype=torch.int64)
    packed = pack_codes(codes.to(torch.uint8), bits)
    per_byte = 4 if bits <= 2 else 2 if bits <= 4 else 1
    assert packed.numel() == -(-codes.numel() // per_byte)
    assert torch.equal(unpack_codes(packed, bits, codes.shape), codes.to(torch.uint8))


def test_saved_model_is_bit_identical(tmp_path):
    fp = class_pipeline()
    q = aq.quantize(fp, aq.QuantConfig(weight_bits=4, act_bits=8), "naive", steps=5, calib_samples=8, progress=False)
    q.save(tmp_path / "q")
    back = aq.load(tmp_path / "q")
    assert back.quant.config.weight_bits == 4 and back.defaults.guidance_scale == 2.0
    a = q.sample(6, seed=4, steps=5, progress=False)
    b = back.sample(6, seed=4, steps=5, progress=False)
    assert torch.equal(a, b)
    x = torch.randn(3, 1, 16, 16)
    cond = aq.Conditions(labels=torch.tensor([1, 5, 9]))
    with torch.no_grad():
        assert torch.equal(q.denoiser()(x, 123, cond), back.denoiser()(x, 123, cond))


def test_text_model_saves_and_loads_bit_identically(tmp_path):
    fp, calib = text_pipeline_and_calibration(3, 2)
    q = aq.quantize(fp, aq.QuantConfig(weight_bits=3, act_bits=6), "naive", calib=calib, steps=3, progress=False)
    q.save(tmp_path / "q")
    back = aq.load(tmp_path / "q")
    x, cond = torch.randn(2, 4, 8, 8), text_conditions(2, seed=9)
    with torch.no_grad():
        assert torch.equal(q.denoiser()(x, 700, cond), back.denoiser()(x, 700, cond))


def _fp32_size(model, tmp_path) -> int:
    model.save_pretrained(str(tmp_path / "fp"), safe_serialization=True)
    return os.path.getsize(tmp_path / "fp" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("bits, limit", [(4, 0.2), (8, 0.3)])
def test_saved_size_ratio(tmp_path, bits, limit):
    model = tiny_unet(channels=(64, 128))
    fp_size = _fp32_size(model, tmp_path)
    pipe = aq.Pipeline(model, dict(diffusers.DDIMScheduler().config), defaults=aq.SamplingDefaults(1.0, 10, 10))
    q = aq.quantize(pipe, aq.QuantConfig(weight_bits=bits, act_bits=8), "naive", steps=2, calib_samples=2, progress=False)
    q.save(tmp_path / "q")
    ratio = os.path.getsize(tmp_path / "q" / "unet" / WEIGHTS_FILE) / fp_size
    print(f"W{bits} saved size ratio: {ratio:.3f}")
    assert ratio <= limit


def test_only_safetensors_and_json_are_written(tmp_path):
    q = aq.quantize(class_pipeline(), method="naive", steps=2, calib_samples=2, progress=False)
    q.save(tmp_path / "q")
    files = [p for p in (tmp_path / "q").rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".json", ".safetensors") for p in files)
    with pytest.raises(aq.AccuQuantError, match="not empty"):
        q.save(tmp_path / "q")
    q.save(tmp_path / "q", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.")]  # no temporaries left


def test_unquantized_pipeline_cannot_be_saved_as_quantized(tmp_path):
    with pytest.raises(aq.AccuQuantError, match="quantized"):
        class_pipeline().save(tmp_path / "x")


def test_a_loaded_model_saves_the_same_files(tmp_path):
    """Loading and saving again writes what the release before the backends wrote (format
    accuquant.quantized/1): the same tensors and the same metadata."""
    from safetensors import safe_open

    legacy = Path(__file__).parent / "data" / "legacy-w4a8"
    aq.load(legacy).save(tmp_path / "again")
    files = {}
    for root in (legacy, tmp_path / "again"):
        with safe_open(str(root / "unet" / WEIGHTS_FILE), "pt") as f:
            files[root] = (f.metadata(), {k: f.get_tensor(k) for k in f.keys()})
    (md_a, ta), (md_b, tb) = files.values()
    assert md_a == md_b and md_a["format"] == FORMAT
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    meta_a, meta_b = (json.loads((r / QUANT_FILE).read_text()) for r in (legacy, tmp_path / "again"))
    assert meta_b["format"] == FORMAT and meta_b["config"] == meta_a["config"] and meta_b["splits"] == meta_a["splits"]


def test_saving_onto_the_fp_model_is_refused_from_python_too(tiny_pipeline_dir, tmp_path):
    """The API protects the FP model as the command line does: a save that would replace the
    model it came from, or write inside it, is refused and leaves it untouched."""
    before = sorted(p.relative_to(tiny_pipeline_dir) for p in tiny_pipeline_dir.rglob("*"))
    q = aq.quantize(str(tiny_pipeline_dir), aq.QuantConfig(weight_bits=8, act_bits=8), "naive", steps=2,
                    calib_samples=2, progress=False)
    for out in (tiny_pipeline_dir, tiny_pipeline_dir / "quantized"):
        with pytest.raises(aq.AccuQuantError, match="the input model"):
            q.save(out, overwrite=True)
    assert sorted(p.relative_to(tiny_pipeline_dir) for p in tiny_pipeline_dir.rglob("*")) == before
    q.save(tmp_path / "q")
    back = aq.load(tmp_path / "q")
    with pytest.raises(aq.AccuQuantError, match="the input model"):  # its base is recorded
        back.save(tiny_pipeline_dir / "again")
