"""The bundled domain ships inside the package: model, classifier, held-out digits."""

import json
from pathlib import Path

import diffusers
import pytest
import torch

import accuquant as aq
from accuquant import bundled
from accuquant.cli import main
from accuquant.eval.evaluation import DigitFeatures


def test_heldout_split_is_balanced():
    images, labels = bundled.heldout()
    assert images.shape == (1000, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    assert torch.bincount(labels, minlength=10).tolist() == [100] * 10


def test_classifier_is_accurate_on_heldout_digits():
    images, labels = bundled.heldout()
    logits = DigitFeatures()(images)["logits"]
    assert (logits.argmax(1) == labels).float().mean().item() >= 0.98


def test_default_model_is_a_guided_class_conditional_unet_with_attention():
    pipe = aq.load(bundled.DEFAULT_MODEL)
    n = sum(p.numel() for p in pipe.model.parameters())
    assert 0.5e6 <= n <= 2e6
    assert type(pipe.model).__name__ == "UNet2DModel" and pipe.model.config.num_class_embeds == 11
    assert any("attentions" in name for name, _ in pipe.model.named_modules())
    assert pipe.defaults.null_class == 10 and pipe.defaults.num_classes == 10 and pipe.defaults.guidance_scale > 1
    assert pipe.source == "bundled:mnist-ddpm"
    x = pipe.sample(2, steps=2, labels=[3, 7], progress=False)
    assert x.shape == (2, 1, 28, 28) and torch.isfinite(x).all()


def test_shipped_weights_stay_small_and_the_package_reads_nothing_outside():
    files = [p for p in bundled.ASSETS.rglob("*") if p.is_file()]
    # five small pipelines and the classifier (about 32 MB): the wheel stays under 40 MB, no file over 10 MB
    assert sum(p.stat().st_size for p in files) < 40 * 2**20
    assert max(p.stat().st_size for p in files) < 10 * 2**20
    src = Path(aq.__file__).parent
    for f in src.rglob("*.py"):
        assert "../shared" not in f.read_text() and "mnist10k" not in f.read_text(), f


def test_commands_default_to_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--method", "naive", "--weight-bits", "8", "--act-bits", "8", "--steps", "2",
                 "--calib-samples", "4", "--out", str(out), "--quiet", "--summary", "0"]) == 0
    meta = json.loads((out / "accuquant.json").read_text())
    assert meta["base_model"] == "bundled:mnist-ddpm"
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--num", "20", "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["weight_bits"] == 8 and r["class_accuracy"] is not None


@pytest.mark.parametrize("name, cls, call", [
    ("mnist-sd", diffusers.StableDiffusionPipeline, lambda p, **kw: p("the digit 7", **kw)),
    ("mnist-dit", diffusers.DiTPipeline, lambda p, **kw: p([7], **kw)),
    # without T5, as diffusers documents dropping it; sampled with the zero tokens it was trained with
    ("mnist-sd3", diffusers.StableDiffusion3Pipeline, lambda p, **kw: p("the digit 7", max_sequence_length=1, **kw)),
    # its 8 T5 tokens, its 32 x 32 images, and true guidance against the empty prompt (it has no guidance embedding)
    ("mnist-flux", diffusers.FluxPipeline,
     lambda p, guidance_scale, **kw: p("the digit 7", negative_prompt="", true_cfg_scale=guidance_scale, height=32,
                                       width=32, max_sequence_length=8, **kw)),
])
def test_bundled_latent_models_are_standard_diffusers_pipelines(name, cls, call):
    kw = {"text_encoder_3": None, "tokenizer_3": None} if name == "mnist-sd3" else {}
    pipe = cls.from_pretrained(str(bundled.ASSETS / name), **kw)  # stored in float16, loaded as float32
    denoiser = pipe.unet if name == "mnist-sd" else pipe.transformer
    assert denoiser.dtype == torch.float32 and 0.5e6 < sum(p.numel() for p in denoiser.parameters()) < 5e6
    images = call(pipe, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    assert images.shape == (1, 1, 32, 32) and torch.isfinite(images).all()
    ours = aq.load(name)
    assert ours.denoiser(1.0).image_shape == (1, 32, 32) and ours.class_labels(12)[:3].tolist() == [0, 1, 2]
