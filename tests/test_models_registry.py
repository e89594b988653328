"""The registry of model families: ``accuquant models``, the README's table made from it,
and the one-line refusal of a denoiser class no family handles."""

import json
from pathlib import Path

import diffusers
import pytest

import accuquant as aq
from accuquant.cli import main
from accuquant.cli.models import table
from accuquant.models import families

README = Path(__file__).resolve().parents[1] / "README.md"
#: the families users deploy, each with its diffusers denoiser class
DEPLOYED = {"SDXL": "UNet2DConditionModel", "FLUX.1": "FluxTransformer2DModel", "PixArt-Σ": "PixArtTransformer2DModel",
            "Sana": "SanaTransformer2DModel", "SD3 / SD3.5": "SD3Transformer2DModel",
            "Wan 2.1": "WanTransformer3DModel"}


def test_models_lists_the_deployed_families(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["family"]: r for r in json.loads(capsys.readouterr().out)}
    for family, cls in DEPLOYED.items():
        assert family in rows and cls in rows[family]["denoiser"], family
        assert rows[family]["pipeline"] and rows[family]["sampler"] in ("ddim", "flow-euler")
    assert rows["FLUX.1"]["sampler"] == "flow-euler" and "FluxAttnProcessor" in rows["FLUX.1"]["attention"]
    assert rows["Wan 2.1"]["media"] == "video"
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == table() and all(f"| {f}" in out for f in DEPLOYED)


def test_the_readme_table_is_the_registry():
    text = README.read_text()
    block = text.split("<!-- models:begin", 1)[1].split("-->", 1)[1].split("<!-- models:end -->", 1)[0]
    assert block.strip() == table(), "README: rerun benchmarks/readme_results.py"


def test_a_denoiser_class_no_family_handles_is_refused_naming_the_families(tmp_path):
    model = diffusers.models.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2)
    model.save_pretrained(str(tmp_path / "vae"))
    with pytest.raises(aq.AccuQuantError) as e:
        aq.load(tmp_path / "vae")
    msg = str(e.value)
    assert "unsupported denoiser AutoencoderKL" in msg and "\n" not in msg
    assert all(f in msg for f in [c.family for c in families()])


def test_a_hub_id_in_the_local_cache_loads_without_the_network(tmp_path, monkeypatch, sd3_pipeline_dir):
    """``--model org/name`` where the hub cache holds that pipeline: read from the cache."""
    import shutil

    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--acme--tiny-sd3"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(sd3_pipeline_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    pipe = aq.load("acme/tiny-sd3")
    assert type(pipe.model).__name__ == "SD3Transformer2DModel" and pipe.defaults.prompts
    with pytest.raises(aq.AccuQuantError, match="not in the hub cache"):
        aq.load("acme/not-there")
