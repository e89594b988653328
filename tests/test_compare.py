"""``accuquant compare``: the runs, the rerun that skips finished pairs, the report."""

import json
import os
import sys
from pathlib import Path

import pytest

from accuquant.cli import main
from accuquant.eval.report import markdown_table, table_rows
from conftest import save_digit_pipeline

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--methods", "naive", "--bits", "w8a8,w2a4", "--num", "16", "--analyze-num", "8", "--steps", "3",
        "--grid", "4", "--calib-samples", "8", "--quiet"]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """One comparison of a tiny 28x28 class-conditional model, shared by the tests here."""
    root = tmp_path_factory.mktemp("compare")
    model = save_digit_pipeline(root / "digits")
    old = os.environ.get("ACCUQUANT_CACHE")
    os.environ["ACCUQUANT_CACHE"] = str(root / "cache")
    try:
        out = root / "report"
        assert main(["compare", "--model", str(model), "--out", str(out), *ARGS]) == 0
        yield model, out
    finally:
        if old is None:
            os.environ.pop("ACCUQUANT_CACHE", None)
        else:
            os.environ["ACCUQUANT_CACHE"] = old


@pytest.mark.slow
def test_compare_scores_every_pair_and_writes_the_report(comparison):
    model, out = comparison
    res = json.loads((out / "results.json").read_text())
    runs = {r["bits"]: r for r in res["runs"]}
    assert set(runs) == {"w8a8", "w2a4"} and res["settings"]["num"] == 16
    w8, w2 = runs["w8a8"]["metrics"], runs["w2a4"]["metrics"]
    assert w8["fid2fp"] < w2["fid2fp"] and w8["psnr"] > w2["psnr"]
    assert w8["weight_bits"] == 8 and w2["act_bits"] == 4
    for r in res["runs"]:
        cost = r["cost"]
        assert cost["peak_rss_mb"] > 100 and cost["calibration_s"] > 0 and cost["weights_mb"] > 0
        assert [e["step"] for e in r["errors"]] == [1, 2, 3]
        assert all(e["fid2fp_x0"] is not None for e in r["errors"])  # x0 FID at every step
        assert r["errors"][-1]["accumulated_error"] > 0
    # the W2A4 model drifts further from FP than the W8A8 one by the last step
    assert runs["w2a4"]["errors"][-1]["accumulated_error"] > runs["w8a8"]["errors"][-1]["accumulated_error"]
    for name in ("report.md", "report.html", "grid-w8a8.png", "grid-w2a4.png", "errors-w8a8.png",
                 "errors-w2a4.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert "| naive | w2a4 |" in md and "![samples at w8a8](grid-w8a8.png)" in md
    lo, hi = w2["fid2fp_interval"]
    assert f"{w2['fid2fp']:.3f} ({lo:.3f}..{hi:.3f})" in md  # with its bootstrap interval
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and 'id="results-table"' in html
    assert "src=\"grid" not in html  # self-contained: no file references


@pytest.mark.slow
def test_a_rerun_keeps_finished_pairs_and_other_settings_are_refused(comparison, capsys):
    model, out = comparison
    stamp = (out / "models" / "naive-w8a8" / "accuquant.json").stat().st_mtime_ns
    before = json.loads((out / "results.json").read_text())
    assert main(["compare", "--model", str(model), "--out", str(out), *ARGS]) == 0
    after = json.loads((out / "results.json").read_text())
    assert (out / "models" / "naive-w8a8" / "accuquant.json").stat().st_mtime_ns == stamp
    assert after["run_now"] == [] and after["runs"] == before["runs"]
    # interrupted after quantizing, before scoring: the saved model is kept, only scoring runs again
    (out / "runs" / "naive-w2a4.json").unlink()
    capsys.readouterr()
    assert main(["compare", "--model", str(model), "--out", str(out), *ARGS]) == 0
    assert "naive w2a4: quantized earlier, kept" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert again["run_now"] == ["naive-w2a4"] and again["runs"][1]["cost"] == before["runs"][1]["cost"]
    assert again["runs"][1]["metrics"]["fid2fp"] == pytest.approx(before["runs"][1]["metrics"]["fid2fp"])
    # a record of an older version of its method is redone, model included
    rec = json.loads((out / "runs" / "naive-w8a8.json").read_text())
    assert rec["method_version"] == 1
    for f in (out / "runs" / "naive-w8a8.json", out / "models" / "naive-w8a8.cost.json"):
        f.write_text(json.dumps({**json.loads(f.read_text()), "method_version": 0}))
    capsys.readouterr()
    assert main(["compare", "--model", str(model), "--out", str(out), *ARGS]) == 0
    assert "naive w8a8: quantizing" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["run_now"] == ["naive-w8a8"]
    assert json.loads((out / "runs" / "naive-w8a8.json").read_text())["method_version"] == 1
    other = [a if a != "16" else "32" for a in ARGS]  # --num 32
    assert main(["compare", "--model", str(model), "--out", str(out), *other]) == 2
    assert "other settings (num)" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--bits", "w9a8"], "--bits: weight bits: 9 bits is out of range"),
    (["--bits", "w4"], "--bits: bit widths 'w4': not of the form w<bits>a<bits>"),
    (["--bits", "w4,w8a8"], "--bits: bit widths 'w4'"),
    (["--methods", "magic"], "unknown method"),
    (["--num", "0"], "num"),
    (["--backend", "magic"], "unknown backend"),
    (["--weight-group", "1"], "weight_group: expected a group size"),
    (["--outliers", "magic"], "outliers: 'magic' is not one of"),
])
def test_bad_input_is_refused_in_one_line(tmp_path, capsys, args, message):
    assert main(["compare", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_models_can_be_scored_on_the_int8_backend(comparison, tmp_path, capsys):
    """``--backend int8`` scores the saved models on the integer kernels; the backend is part
    of the settings, so the same directory refuses a rerun on another backend."""
    from accuquant.backends.int8 import available

    if not available():
        pytest.skip("this torch build has no oneDNN int8 kernels")
    model, _ = comparison
    out = tmp_path / "int8"
    args = [a if a != "w8a8,w2a4" else "w4a8" for a in ARGS]
    assert main(["compare", "--model", str(model), "--out", str(out), "--backend", "int8", *args]) == 0
    res = json.loads((out / "results.json").read_text())
    (run,) = res["runs"]
    assert res["settings"]["backend"] == "int8" and run["bits"] == "w4a8"
    assert run["metrics"]["psnr"] > 10 and run["metrics"]["fid2fp"] >= 0
    capsys.readouterr()
    assert main(["compare", "--model", str(model), "--out", str(out), *args]) == 2
    assert "other settings (backend)" in capsys.readouterr().err


def test_an_unrelated_directory_is_not_used(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["compare", "--out", str(mine), "--methods", "naive", "--bits", "w8a8"]) == 2
    assert "holds no comparison" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_best_values_are_marked_per_bit_width():
    def run(method, bits, fid2fp, psnr, secs):
        return {"method": method, "bits": bits, "metrics": {"fid2fp": fid2fp, "psnr": psnr},
                "cost": {"calibration_s": secs, "init_cached": method == "accuquant"}}

    res = {"settings": {"bits": ["w4a8", "w8a8"]}, "fp": {"fid": 3.0},
           "runs": [run("naive", "w4a8", 90.0, 20.0, 5.0), run("accuquant", "w4a8", 5.0, 25.0, 100.0),
                    run("naive", "w8a8", 0.1, 40.0, 6.0), run("accuquant", "w8a8", 0.2, 41.0, 50.0)]}
    rows = {(r["method"], r["bits"]): r for r in table_rows(res)}
    assert rows["accuquant", "w4a8"]["best"] >= {"fid2fp", "psnr"}
    assert "calibration_s" in rows["naive", "w4a8"]["best"] and "fid2fp" in rows["naive", "w8a8"]["best"]
    assert rows["accuquant", "w4a8"]["note"] == "†"
    md = markdown_table(res)
    assert "| accuquant | w4a8 | **5.000** |" in md and "| naive | w8a8 | **0.100** |" in md


@pytest.mark.slow
def test_the_report_renders_in_a_headless_browser(comparison):
    sys.path.insert(0, str(ROOT / "scripts"))
    import check_report

    if check_report.chromium() is None:
        if os.environ.get("ACCUQUANT_REQUIRE_CHROMIUM"):  # CI installs it: a missing browser is a failure there
            pytest.fail("ACCUQUANT_REQUIRE_CHROMIUM is set but no chromium was found")
        pytest.skip("no chromium on this machine")
    _, out = comparison
    loaded, images, rows = check_report.check(out / "report.html", out / "shot.png")
    assert images == 4 and loaded == 4 and rows == 3  # FP and two pairs
    assert (out / "shot.png").stat().st_size > 10_000


# --------------------------------------------------------------------------- prompts
def test_prompts_are_a_setting_that_leaves_earlier_keys_alone(tmp_path):
    """Without prompts a comparison's key is what it was before prompts existed (earlier
    comparisons stay valid); given prompts are part of it (other prompts: other results)."""
    import dataclasses

    from accuquant.errors import AccuQuantError
    from accuquant.eval.compare import CompareSettings, prepare_out

    s = CompareSettings(model="m", methods=["naive"], bits=["w4a8"])
    assert s.run_key() == {"model": "m", "num": 1000, "steps": 20, "scheduler": None, "calib_samples": 64, "seed": 0,
                           "analyze_num": 256, "grid": 10}
    p = dataclasses.replace(s, prompts=["the digit 7"])
    assert p.run_key() == {**s.run_key(), "prompts": ["the digit 7"]}
    out = tmp_path / "c"
    (out / "runs").mkdir(parents=True)
    earlier = {k: v for k, v in dataclasses.asdict(s).items() if k not in ("prompts", "backend")}
    (out / "compare.json").write_text(json.dumps(earlier))  # written before backends and prompts
    prepare_out(out, s)
    assert json.loads((out / "compare.json").read_text())["prompts"] is None
    with pytest.raises(AccuQuantError, match=r"other settings \(prompts\)"):
        prepare_out(out, p)
    for bad in ([], "the digit 7", [""]):
        with pytest.raises(AccuQuantError, match="prompts: expected a non-empty list"):
            dataclasses.replace(s, prompts=bad).check()


class _Started(Exception):
    pass


def _stop_at_popen(monkeypatch) -> dict:
    """Make the next subprocess start raise ``_Started``, its command kept as ``seen["cmd"]``."""
    import subprocess

    seen = {}

    def popen(cmd, **kw):
        seen["cmd"] = cmd
        raise _Started

    monkeypatch.setattr(subprocess, "Popen", popen)
    return seen


def test_prompts_reach_the_quantize_process_and_the_command_line_settings(tmp_path, monkeypatch):

    from accuquant.errors import AccuQuantError
    from accuquant.eval import compare

    seen = _stop_at_popen(monkeypatch)
    s = compare.CompareSettings(model="m", methods=["naive"], bits=["wfpa6"], scheduler="ddim",
                                prompts=["the digit 7", "a handwritten nine"])
    with pytest.raises(_Started):
        compare.quantize_process(s, "naive", "wfpa6", tmp_path / "q", quiet=True)
    cmd = seen["cmd"]
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--prompt"] == ["the digit 7", "a handwritten nine"]
    assert cmd[cmd.index("--weight-bits") + 1] == "none" and cmd[cmd.index("--act-bits") + 1] == "6"

    def run_compare(settings, out, quiet=False):
        seen["settings"] = settings
        raise AccuQuantError("stopped here")

    monkeypatch.setattr(compare, "run_compare", run_compare)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten nine\n\n")
    assert main(["compare", "--out", str(tmp_path / "o"), "--prompt", "the digit 7", "--prompt-file",
                 str(prompts)]) == 2
    assert seen["settings"].prompts == ["the digit 7", "a handwritten nine"]
    assert main(["compare", "--out", str(tmp_path / "o")]) == 2
    assert seen["settings"].prompts is None


def test_quantization_options_and_recipes_reach_every_pair(tmp_path, monkeypatch):
    """Options given to compare go to every pair's quantize process (and into the key: other
    options, other results); a recipe is a method name there, run as its method."""
    import dataclasses

    from accuquant.errors import AccuQuantError
    from accuquant.eval import compare

    seen = _stop_at_popen(monkeypatch)
    s = compare.CompareSettings(model="m", methods=["svdquant", "accuquant"], bits=["w4a4"], scheduler="ddim",
                                quant={"act-granularity": "token", "outliers": ["smooth", "lowrank"], "rank": 8})
    s.check()
    assert s.run_key()["quant"] == s.quant and "quant" not in dataclasses.replace(s, quant=None).run_key()
    with pytest.raises(_Started):
        compare.quantize_process(s, "svdquant", "w4a4", tmp_path / "q", quiet=True)
    cmd = seen["cmd"]
    assert cmd[cmd.index("--method") + 1] == "svdquant"
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--outliers"] == ["smooth", "lowrank"]
    assert cmd[cmd.index("--rank") + 1] == "8" and cmd[cmd.index("--act-granularity") + 1] == "token"
    with pytest.raises(AccuQuantError, match="'weight-bits' is not a quantization option of compare"):
        dataclasses.replace(s, quant={"weight-bits": 4}).check()

    def run_compare(settings, out, quiet=False):
        seen["settings"] = settings
        raise AccuQuantError("stopped here")

    monkeypatch.setattr(compare, "run_compare", run_compare)
    assert main(["compare", "--out", str(tmp_path / "o"), "--methods", "svdquant,accuquant", "--bits", "w4a4",
                 "--weight-group", "64", "--outliers", "smooth,rotate"]) == 2
    assert seen["settings"].quant == {"weight-group": 64, "outliers": ["smooth,rotate"]}


def test_corrections_compose_with_methods_in_compare(tmp_path, monkeypatch):
    """``method+correction`` and a correction's shorthand are method names of compare, each
    passed as it is to its quantize process."""
    from accuquant.errors import AccuQuantError
    from accuquant.eval import compare

    seen = _stop_at_popen(monkeypatch)
    s = compare.CompareSettings(model="m", methods=["naive", "ptqd", "accuquant+ptqd"], bits=["w4a8"],
                                scheduler="ddim")
    s.check()
    with pytest.raises(_Started):
        compare.quantize_process(s, "accuquant+ptqd", "w4a8", tmp_path / "q", quiet=True)
    assert seen["cmd"][seen["cmd"].index("--method") + 1] == "accuquant+ptqd"
    with pytest.raises(AccuQuantError, match="unknown correction 'nope'"):
        compare.CompareSettings(model="m", methods=["naive+nope"], bits=["w4a8"]).check()
