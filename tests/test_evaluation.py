import json
import math

import pytest
import torch

import accuquant as aq
from accuquant.eval import evaluation
from accuquant.eval.analysis import COLUMNS, error_accumulation, read_csv
from accuquant.cli import main


def test_fp_model_against_itself(digit_pipeline_dir):
    fp = aq.load(digit_pipeline_dir)
    r = evaluation.evaluate(fp, num=20, steps=3, progress=False)
    assert r["fid2fp"] < 1e-6 and math.isinf(r["psnr"]) and r["ssim"] == pytest.approx(1.0)
    assert r["method"] == "fp" and r["features"] == "digits"
    assert r["fid"] > 0 and r["sfid"] > 0 and 1.0 <= r["is"] <= 10.0 and 0.0 <= r["class_accuracy"] <= 1.0
    safe = evaluation.to_json_safe(r)
    assert safe["psnr"] is None and safe["identical"] is True
    json.dumps(safe, allow_nan=False)
    assert "psnr" in evaluation.format_table(r) and "inf" in evaluation.format_table(r)


def test_degraded_model_scores_worse_and_fp_samples_are_cached(digit_pipeline_dir, tmp_path, monkeypatch):
    fp = aq.load(digit_pipeline_dir)
    results = {}
    for name, cfg in {"w8a8": aq.QuantConfig(8, 8), "w2a4": aq.QuantConfig(2, 4)}.items():
        q = aq.quantize(fp, cfg, "naive", steps=3, calib_samples=8, progress=False)
        q.save(tmp_path / name)
        results[name] = evaluation.evaluate(aq.load(tmp_path / name), num=40, steps=3, progress=False)
    w8, w2 = results["w8a8"], results["w2a4"]
    assert w8["weight_bits"] == 8 and w2["act_bits"] == 4 and w8["method"] == "naive"
    assert w8["fid2fp"] < w2["fid2fp"]
    for r in (w8, w2):  # the bootstrap interval holds the distance
        assert r["fid2fp_interval"][0] <= r["fid2fp"] < r["fid2fp_interval"][1]
    assert w8["psnr"] > w2["psnr"] and w8["ssim"] > w2["ssim"]
    assert w8["psnr"] > 18  # an untrained model, guided: the W8A8 samples still follow the FP ones
    # the FP samples of the base model came from the cache the second time
    calls = []
    real = aq.Pipeline.sample
    monkeypatch.setattr(aq.Pipeline, "sample", lambda self, *a, **k: calls.append(self.quant) or real(self, *a, **k))
    again = evaluation.evaluate(aq.load(tmp_path / "w8a8"), num=40, steps=3, progress=False)
    assert len(calls) == 1 and calls[0] is not None  # only the quantized model sampled
    assert again["fid2fp"] == pytest.approx(w8["fid2fp"]) and again["psnr"] == pytest.approx(w8["psnr"])


def test_cli_evaluate_json_and_analyze(digit_pipeline_dir, tmp_path, capsys):
    assert main(["quantize", "--model", str(digit_pipeline_dir), "--method", "naive", "--weight-bits", "4",
                 "--act-bits", "8", "--steps", "3", "--calib-samples", "4", "--out", str(tmp_path / "q"),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "q"), "--num", "20", "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("fid2fp", "fid", "sfid", "is", "psnr", "ssim", "class_accuracy", "num", "steps", "weight_bits",
                "act_bits"):
        assert key in r
    assert r["num"] == 20 and r["steps"] == 3 and r["weight_bits"] == 4 and r["act_bits"] == 8
    assert main(["evaluate", "--model", str(digit_pipeline_dir), "--num", "10", "--steps", "2", "--quiet"]) == 0
    assert "fid2fp" in capsys.readouterr().out
    out = tmp_path / "err"
    assert main(["analyze", "--model", str(tmp_path / "q"), "--num", "16", "--out", str(out), "--quiet"]) == 0
    rows = read_csv(str(out) + ".csv")
    assert [list(r) for r in rows[:1]] == [list(COLUMNS)] and len(rows) == 3
    assert (tmp_path / "err.png").stat().st_size > 1000
    code = main(["analyze", "--model", str(tmp_path / "q"), "--num", "16", "--out", str(out), "--quiet"])
    assert code == 2  # outputs exist


def test_error_accumulation_on_known_models(digit_pipeline_dir):
    fp = aq.load(digit_pipeline_dir)
    rows = error_accumulation(fp, num=8, steps=4, progress=False, x0_points=2)
    assert all(r["step_error"] == 0 and r["accumulated_error"] == 0 for r in rows)
    q = aq.quantize(fp, aq.QuantConfig(3, 6), "naive", steps=4, calib_samples=4, progress=False)
    rows = error_accumulation(q, base=fp, num=8, steps=4, progress=False, x0_points=2)
    assert all(r["step_error"] > 0 for r in rows)
    assert rows[-1]["accumulated_error"] > 0
    assert [r["fid2fp_x0"] is not None for r in rows] == [True, False, False, True]


def test_missing_inception_weights_are_reported(monkeypatch):
    monkeypatch.delenv("ACCUQUANT_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(aq.AccuQuantError, match="(torch-fidelity|weights are not available)"):
        evaluation.feature_extractor("auto", (3, 32, 32))
    with pytest.raises(aq.AccuQuantError, match="unknown feature network"):
        evaluation.feature_extractor("vgg", (1, 28, 28))


def test_lpips_without_its_package_or_weights_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lpips(name, *a, **k):
        if name == "lpips":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lpips)
    with pytest.raises(aq.AccuQuantError, match="LPIPS"):
        evaluation.lpips_distance(torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28))


def test_digit_features_read_padded_32x32_digits_as_the_28x28_ones():
    from accuquant import bundled

    real, labels = bundled.heldout()
    real, labels = real[:50], labels[:50]
    feats = evaluation.DigitFeatures()
    padded = torch.nn.functional.pad(real, (2, 2, 2, 2))  # background is 0 in [0, 1]
    a, b = feats(real), feats(padded)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["pool"], b["pool"])
    assert (a["logits"].argmax(1) == labels).float().mean() > 0.95
    assert evaluation.feature_extractor("auto", (1, 32, 32)).name == "digits"
    with pytest.raises(aq.AccuQuantError, match="1x28x28 or 1x32x32"):
        feats(torch.zeros(2, 1, 16, 16))


# --------------------------------------------------------------------------- a user's own text model, scored on prompts
@pytest.fixture
def promptless_text_dir(sd_pipeline_dir):
    """The tiny Stable Diffusion pipeline as a user's own would come: no accuquant_sampling.json
    (no default prompts); on 16x16 latents, so that its 32x32 images suit the digit features."""
    unet_cfg = sd_pipeline_dir / "unet" / "config.json"
    unet_cfg.write_text(json.dumps({**json.loads(unet_cfg.read_text()), "sample_size": 16}))
    (sd_pipeline_dir / "accuquant_sampling.json").unlink()
    return sd_pipeline_dir


def test_a_promptless_text_model_is_evaluated_and_analyzed_on_given_prompts(promptless_text_dir, tmp_path, capsys,
                                                                           monkeypatch):
    model = promptless_text_dir
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten nine\n")
    q = tmp_path / "q"
    seen = []  # the quality summary after quantizing scores the prompts quantize was given
    real = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: seen.append(k.get("prompts")) or real(*a, **k))
    assert main(["quantize", "--model", str(model), "--method", "naive", "--weight-bits", "8", "--act-bits", "8",
                 "--weight-init", "minmax", "--act-init", "minmax", "--steps", "2", "--calib-samples", "2",
                 "--prompt", "the digit 7", "--prompt-file", str(prompts), "--summary", "4", "--out", str(q),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "quality against FP on 4 paired samples" in out and "naive:" in out
    assert seen == [["the digit 7", "a handwritten nine"]]
    monkeypatch.setattr(evaluation, "evaluate", real)
    # without prompts it cannot be sampled: one line, before any sampling
    assert main(["evaluate", "--model", str(q), "--num", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no default prompts" in err and len(err.strip().splitlines()) == 1
    assert main(["evaluate", "--model", str(q), "--num", "4", "--prompt", "the digit 7", "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["prompts"] == ["the digit 7"] and r["features"] == "digits" and r["num"] == 4 and r["steps"] == 2
    assert r["psnr"] > 0 and r["fid2fp"] >= 0 and r["class_accuracy"] is None  # the prompt's digit is not known
    assert main(["evaluate", "--model", str(q), "--num", "4", "--prompt-file", str(prompts), "--quiet"]) == 0
    table = [ln.split(None, 1) for ln in capsys.readouterr().out.splitlines()]
    assert ["prompts", "a handwritten nine"] in table
    err_out = tmp_path / "err"
    assert main(["analyze", "--model", str(q), "--num", "4", "--prompt", "the digit 7", "--out", str(err_out),
                 "--quiet"]) == 0
    rows = read_csv(str(err_out) + ".csv")
    assert len(rows) == 2 and rows[-1]["accumulated_error"] > 0
    assert main(["analyze", "--model", str(q), "--num", "4", "--out", str(tmp_path / "err2"), "--quiet"]) == 2
    assert "no default prompts" in capsys.readouterr().err and not (tmp_path / "err2.csv").exists()


def test_prompts_through_the_api_and_in_the_fp_samples_key(promptless_text_dir, tmp_path):
    """evaluate, fp_samples and error_accumulation take prompts; FP samples of other prompts are
    other cache entries (the encoded prompts are in the key), the same prompts hit the cache."""
    from accuquant.cache import cache_dir

    fp = aq.load(promptless_text_dir)
    fast = aq.QuantConfig(4, 8, weight_init="minmax", act_init="minmax")  # the MSE range search takes long
    q = aq.quantize(fp, fast, "naive", steps=2, calib_samples=2, prompts=["the digit 7"], progress=False)
    seven = evaluation.fp_samples(fp, 4, 0, 2, "ddim", prompts=["the digit 7"], progress=False)
    assert torch.equal(seven, fp.sample(4, steps=2, scheduler="ddim", prompts=["the digit 7"], progress=False))
    entries = lambda: sorted((cache_dir() / "samples").glob("*.safetensors"))  # noqa: E731
    assert len(entries()) == 1
    nine = evaluation.fp_samples(fp, 4, 0, 2, "ddim", prompts=["a handwritten nine"], progress=False)
    assert len(entries()) == 2 and not torch.equal(seven, nine)
    again = evaluation.fp_samples(fp, 4, 0, 2, "ddim", prompts=["the digit 7"], progress=False)
    assert len(entries()) == 2 and torch.equal(again, seven)
    r7 = evaluation.evaluate(q, fp, num=4, steps=2, prompts=["the digit 7"], progress=False)
    r9 = evaluation.evaluate(q, fp, num=4, steps=2, prompts=["a handwritten nine"], progress=False)
    assert len(entries()) == 2  # both FP sets came from the cache
    assert r7["prompts"] == ["the digit 7"] and r7["psnr"] != r9["psnr"]
    rows = error_accumulation(q, fp, num=4, steps=2, prompts=["the digit 7"], progress=False, x0_points=2)
    assert len(rows) == 2 and all(r["step_error"] > 0 for r in rows)
    with pytest.raises(aq.AccuQuantError, match="no default prompts"):
        evaluation.evaluate(q, fp, num=4, steps=2, progress=False)
    with pytest.raises(aq.AccuQuantError, match="no default prompts"):
        error_accumulation(q, fp, num=4, steps=2, progress=False)


def test_quality_summary_rows_against_fp_and_naive(digit_pipeline_dir):
    """The quantize command's summary as a function: the model's row, then the naive method's
    at the same config, calibrated on the same data (the record's), all against the FP model."""
    fp = aq.load(digit_pipeline_dir)
    cfg = aq.QuantConfig(4, 8, weight_init="minmax", act_init="minmax")
    naive = aq.quantize(fp, cfg, "naive", steps=2, calib_samples=4, seed=3, progress=False)
    (only,) = evaluation.quality_summary(naive, fp, 8, progress=False)  # a naive model is its own comparison
    assert only["method"] == "naive" and only["num"] == 8 and only["steps"] == 2
    # a model of another method (here the naive one, renamed) gets the naive row, recalibrated
    # like it: the same config, samples, seed and sampler give the same model again
    naive.quant.method = "per-step"
    rows = evaluation.quality_summary(naive, fp, 8, progress=False)
    assert [r["method"] for r in rows] == ["per-step", "naive"]
    assert rows[0]["psnr"] == rows[1]["psnr"] == only["psnr"] and rows[1]["weight_bits"] == 4
    other = evaluation.quality_summary(naive, fp, 8, progress=False, calib_options={"seed": 4})
    assert other[1]["psnr"] != rows[1]["psnr"]  # the options given replace the record's
    with pytest.raises(aq.AccuQuantError, match="not quantized"):
        evaluation.quality_summary(fp, fp, 8)
