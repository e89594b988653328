import os
import shutil
import subprocess
import sys

import diffusers
import pytest
import torch
from PIL import Image

from accuquant.cli import main


def run(capsys, *args):
    capsys.readouterr()  # drop what the test itself printed
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _quantize_args(model, out, *extra):
    return ["quantize", "--model", model, "--method", "naive", "--weight-bits", "4", "--act-bits", "8",
            "--steps", "4", "--scheduler", "ddim", "--calib-samples", "4", "--seed", "0", "--out", out,
            "--quiet", *extra]


def test_quantize_then_sample_a_saved_pipeline(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "q"
    code, stdout, err = run(capsys, *_quantize_args(tiny_pipeline_dir, out))
    assert code == 0, err
    assert "kept in full precision: conv_in, conv_out" in stdout and "from the cache" not in stdout
    code, again, err = run(capsys, *_quantize_args(tiny_pipeline_dir, tmp_path / "again"))
    assert code == 0 and "the calibration came from the cache" in again, err
    assert (out / "accuquant.json").is_file() and (out / "unet" / "accuquant_weights.safetensors").is_file()
    grid = tmp_path / "grid.png"
    code, stdout, err = run(capsys, "sample", "--model", out, "--num", 16, "--seed", 0, "--out", grid, "--quiet")
    assert code == 0, err
    img = Image.open(grid)
    assert img.size == (4 * 18 + 2, 4 * 18 + 2) and img.mode == "RGB"
    assert "4 ddim steps" in stdout  # the calibrated sampler is the default
    # the FP model samples from the same command
    code, _, err = run(capsys, "sample", "--model", tiny_pipeline_dir, "--num", 4, "--steps", 3,
                       "--out", tmp_path / "fp.png", "--quiet")
    assert code == 0, err


def _assert_refused(code, err, out_path=None):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("accuquant: error: "), err
    assert "Traceback" not in err
    if out_path is not None:
        assert not out_path.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--act-bits", "1"], "act_bits: 1 bits is out of range"),
        (["--weight-bits", "four"], "expected a bit width"),
        (["--device", "tpu"], "device: expected cpu, cuda or cuda:N"),  # more in test_bad_inputs.py
        (["--percentile", "40"], "percentile: expected a value in (50, 100]"),
        (["--percentile", "many"], "percentile: expected a value in (50, 100], got 'many'"),
        (["--weight-granularity", "row"], "weight_granularity: 'row' is not one of channel, tensor"),
        (["--act-granularity", "channel"], "act_granularity: 'tensor' (static, one range) or 'token'"),
        (["--act-init", "magic"], "act_init: 'magic' is not one of minmax, percentile, mse"),
        (["--attn-bits", "eleven"], "attn_bits: expected a bit width"),
    ],
)
def test_bad_options_are_refused(tiny_pipeline_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "q"
    code, _, err = run(capsys, *_quantize_args(tiny_pipeline_dir, out, *extra))
    _assert_refused(code, err, out)
    assert message in err


def test_paths_that_are_not_diffusers_models(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    afile = tmp_path / "notes.txt"
    afile.write_text("hello")
    for bad in (empty, afile, tmp_path / "missing", "not a model"):
        code, _, err = run(capsys, *_quantize_args(bad, tmp_path / "q"))
        _assert_refused(code, err, tmp_path / "q")
    code, _, err = run(capsys, "sample", "--model", empty, "--out", tmp_path / "g.png")
    _assert_refused(code, err, tmp_path / "g.png")


def test_truncated_and_corrupt_safetensors(tiny_pipeline_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_pipeline_dir, bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, *_quantize_args(bad, tmp_path / "q"))
    _assert_refused(code, err, tmp_path / "q")
    assert "corrupt or truncated safetensors" in err
    weights.write_bytes(b"\xff" * 64)
    code, _, err = run(capsys, *_quantize_args(bad, tmp_path / "q"))
    _assert_refused(code, err, tmp_path / "q")
    # a damaged quantized model is refused by sample
    code, _, _ = run(capsys, *_quantize_args(tiny_pipeline_dir, tmp_path / "good"))
    assert code == 0
    qw = tmp_path / "good" / "unet" / "accuquant_weights.safetensors"
    qw.write_bytes(qw.read_bytes()[:-10])
    code, _, err = run(capsys, "sample", "--model", tmp_path / "good", "--out", tmp_path / "g.png")
    _assert_refused(code, err, tmp_path / "g.png")


def test_existing_output_directory(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run(capsys, *_quantize_args(tiny_pipeline_dir, out))
    _assert_refused(code, err)
    assert "not empty" in err and (out / "keep.txt").read_text() == "precious"
    code, _, err = run(capsys, *_quantize_args(tiny_pipeline_dir, out, "--overwrite"))
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "accuquant.json").is_file()
    # an empty directory is fine
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, *_quantize_args(tiny_pipeline_dir, tmp_path / "empty"))
    assert code == 0, err
    # sample refuses to overwrite an existing image
    (tmp_path / "g.png").write_bytes(b"x")
    code, _, err = run(capsys, "sample", "--model", out, "--out", tmp_path / "g.png")
    _assert_refused(code, err)


def test_nan_or_inf_weights_are_refused(tiny_pipeline_dir, tmp_path, capsys):
    for bad_value in (float("nan"), float("inf")):
        pipe = diffusers.DDPMPipeline.from_pretrained(str(tiny_pipeline_dir))
        with torch.no_grad():
            pipe.unet.down_blocks[0].resnets[0].conv1.weight[0, 0, 0, 0] = bad_value
        bad = tmp_path / f"bad-{bad_value}"
        pipe.save_pretrained(str(bad))
        code, _, err = run(capsys, *_quantize_args(bad, tmp_path / "q"))
        _assert_refused(code, err, tmp_path / "q")
        assert "NaN or inf" in err


def test_console_script_exits_2_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "accuquant", "quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "q")],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"accuquant: error: {tmp_path / 'nope'}: no such file or directory"]


def test_attention_bits_none_and_bad_devices(tiny_pipeline_dir, tmp_path, capsys):
    import json

    out = tmp_path / "q"
    code, _, err = run(capsys, *_quantize_args(tiny_pipeline_dir, out, "--attn-bits", "none", "--softmax-bits", "6"))
    assert code == 0, err
    cfg = json.loads((out / "accuquant.json").read_text())["config"]
    assert cfg["attn_bits"] is None and cfg["softmax_bits"] == 6
    for device in ("cudax", "cuda:7", "tpu"):
        code, _, err = run(capsys, *_quantize_args(tiny_pipeline_dir, tmp_path / "q2", "--device", device))
        _assert_refused(code, err, tmp_path / "q2")


def test_malformed_quantized_directory_is_refused(tiny_pipeline_dir, tmp_path, capsys):
    import json

    out = tmp_path / "q"
    assert run(capsys, *_quantize_args(tiny_pipeline_dir, out))[0] == 0
    meta = json.loads((out / "accuquant.json").read_text())
    del meta["config"]
    (out / "accuquant.json").write_text(json.dumps(meta))
    code, _, err = run(capsys, "sample", "--model", out, "--out", tmp_path / "g.png")
    _assert_refused(code, err, tmp_path / "g.png")
    (out / "accuquant.json").write_text("{not json")
    code, _, err = run(capsys, "sample", "--model", out, "--out", tmp_path / "g.png")
    _assert_refused(code, err, tmp_path / "g.png")


def test_learning_flags_are_refused_for_naive(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "q"
    code, _, err = run(capsys, *_quantize_args(tiny_pipeline_dir, out, "--iters", "10"))
    _assert_refused(code, err, out)
    assert "--iters: not an option of the naive method; it learns nothing" in err
    code, _, err = run(capsys, *_quantize_args(tiny_pipeline_dir, out, "--lr", "-1"))
    _assert_refused(code, err, out)


def test_each_method_takes_only_its_own_flags(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "q"
    args = _quantize_args(tiny_pipeline_dir, out, "--group-size", "2")
    args[args.index("naive")] = "per-step"
    code, _, err = run(capsys, *args)
    _assert_refused(code, err, out)
    assert "--group-size: not an option of the per-step method" in err
    args = _quantize_args(tiny_pipeline_dir, out, "--grad", "magic")
    args[args.index("naive")] = "accuquant"
    code, _, err = run(capsys, *args)
    _assert_refused(code, err, out)
    assert "grad: 'magic' is not one of exact, checkpoint, approx" in err


@pytest.mark.slow
def test_accuquant_from_the_command_line(digit_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "q"
    code, stdout, err = run(capsys, "quantize", "--model", digit_pipeline_dir, "--steps", "4", "--calib-samples", "4",
                            "--init", "naive", "--iters", "6", "--group-size", "2", "--grad", "approx",
                            "--batch-size", "2", "--out", out, "--quiet", "--summary", "8")
    assert code == 0, err
    assert "with accuquant at W4A8" in stdout  # the defaults: AccuQuant, 4-bit weights, 8-bit activations
    assert "quality against FP on 8 paired samples" in stdout and "naive:" in stdout
    import json

    meta = json.loads((out / "accuquant.json").read_text())
    assert meta["method"] == "accuquant"
    assert meta["method_log"]["evaluations"]["backward"] == 6 * 2 * 2 * 2  # iters x batch x branches x M


def _per_step_cmd(model, out, cache):
    return [sys.executable, "-m", "accuquant", "quantize", "--model", str(model), "--method", "per-step",
            "--weight-bits", "4", "--act-bits", "8", "--steps", "3", "--calib-samples", "4", "--batch-size", "8",
            "--iters", "60", "--act-iters", "10", "--samples-per-step", "2", "--out", str(out), "--quiet"]


@pytest.mark.slow
def test_per_step_killed_with_ctrl_c_resumes_to_the_same_model(digit_pipeline_dir, tmp_path):
    """A real interruption: SIGINT to the process once a block is done, then --resume (early,
    so that under load the run cannot finish before the signal lands)."""
    import signal
    import time

    from safetensors import safe_open
    from safetensors.torch import load_file

    env = dict(os.environ, PYTHONWARNINGS="ignore", ACCUQUANT_CACHE=str(tmp_path / "cache"))
    full = subprocess.run(_per_step_cmd(digit_pipeline_dir, tmp_path / "full", tmp_path), capture_output=True,
                          text=True, env=env)
    assert full.returncode == 0, full.stderr
    runs = tmp_path / "cache" / "runs"
    # A job started in the background by a shell inherits SIGINT ignored, and so would the
    # child: give it the default disposition, as a terminal's Ctrl-C finds it.
    proc = subprocess.Popen(_per_step_cmd(digit_pipeline_dir, tmp_path / "resumed", tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        for f in runs.glob("*.safetensors"):
            try:
                with safe_open(str(f), "pt") as fh:
                    done = int(fh.metadata()["done"])
            except Exception:  # being replaced at this very moment
                pass
        if done >= 1:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=60)
    assert done >= 1 and proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert not (tmp_path / "resumed").exists()
    resumed = subprocess.run(_per_step_cmd(digit_pipeline_dir, tmp_path / "resumed", tmp_path) + ["--resume"],
                             capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "full" / "unet" / "accuquant_weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "unet" / "accuquant_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import json

    log = json.loads((tmp_path / "resumed" / "accuquant.json").read_text())["method_log"]
    assert log["resumed_at"]["unit"] >= 1
    assert not list(runs.glob("*.safetensors"))  # the checkpoint is gone once the run finished


# --------------------------------------------------------------------------- one option system
def _quantize_parser():
    from accuquant.cli import build_parser

    return build_parser()._subparsers._group_actions[0].choices["quantize"]


def test_quantization_flags_build_the_config_through_its_own_parsing():
    """Every QuantConfig option is a flag: bools switch from their default, keep_fp repeats,
    bit widths go through the config's parsing (none, act, 16)."""
    import accuquant as aq
    from accuquant.cli import build_parser
    from accuquant.cli.options import quant_config

    args = build_parser().parse_args([
        "quantize", "--weight-bits", "none", "--act-bits", "6", "--attn-bits", "act", "--softmax-bits", "16",
        "--weight-granularity", "tensor", "--act-granularity", "tensor", "--weight-symmetric", "--act-symmetric",
        "--keep-fp", "conv_in", "--keep-fp", "*.proj_out", "--no-split-shortcut", "--weight-init", "minmax",
        "--act-init", "percentile", "--percentile", "99.5"])
    assert quant_config(args) == aq.QuantConfig(
        weight_bits=None, act_bits=6, attn_bits="act", softmax_bits=None, weight_granularity="tensor",
        weight_symmetric=True, act_symmetric=True, keep_fp=("conv_in", "*.proj_out"), split_shortcut=False,
        weight_init="minmax", act_init="percentile", percentile=99.5)
    # nothing given: the config's own defaults (W4A8, the family's layers kept in FP)
    assert quant_config(build_parser().parse_args(["quantize"])) == aq.QuantConfig()


def test_command_line_defaults_are_the_shared_ones():
    """The defaults the command line shows and uses are config.py's (and compare's settings')."""
    import dataclasses
    import re
    from pathlib import Path

    from accuquant import config
    from accuquant.cli import build_parser
    from accuquant.eval.compare import CompareSettings

    p = build_parser()
    q = p.parse_args(["quantize"])
    assert (q.method, q.calib_samples, q.max_memory) == (
        config.DEFAULT_METHOD, config.DEFAULT_CALIB_SAMPLES, config.parse_size(config.DEFAULT_MAX_MEMORY))
    c = p.parse_args(["compare"])
    for f in dataclasses.fields(CompareSettings):
        if f.default is not dataclasses.MISSING and f.name not in ("prompts", "quant"):  # --prompt(-file); flags
            assert getattr(c, f.name) == f.default, f.name
    assert c.prompt is None and c.prompt_file is None
    assert c.steps == config.DEFAULT_STEPS and c.calib_samples == config.DEFAULT_CALIB_SAMPLES
    assert p.parse_args(["speed", "--model", "m"]).steps == config.DEFAULT_STEPS
    helptext = " ".join(_quantize_parser().format_help().split())
    assert f"samples per forward pass (default {config.DEFAULT_BATCH_SIZE})" in helptext
    assert f"sampling steps (default {config.DEFAULT_STEPS}," in helptext
    # no default of the calibration run is written again in the command line's code
    cli = Path(__import__("accuquant.cli").cli.__file__).parent
    literal = re.compile(r"default=(20|64|32|4|\"2GB\"|\"accuquant\")\b")
    assert not [(f.name, m.group()) for f in cli.glob("*.py") for m in literal.finditer(f.read_text())]


def test_keep_fp_help_names_every_family_default(monkeypatch):
    from accuquant.models import families

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    (line,) = [ln for ln in _quantize_parser().format_help().splitlines() if ln.strip().startswith("--keep-fp ")]
    assert "conv_in, conv_out" in line and "replace the family's" in line
    for cls in families():
        assert cls.family in line and all(p in line for p in cls.keep_fp), cls.family


def test_new_quantization_flags_reach_the_saved_config(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    """Options that had no flag before (act_symmetric, granularity, range search) are used, and
    the default output is named by the bits label (a part in FP: wfp)."""
    import json

    monkeypatch.chdir(tmp_path)
    args = _quantize_args(tiny_pipeline_dir, "unused", "--act-symmetric", "--weight-granularity", "tensor",
                          "--weight-init", "minmax", "--act-init", "percentile", "--percentile", "99.5",
                          "--keep-fp", "conv_in", "--no-split-shortcut")
    del args[args.index("--out"):args.index("--out") + 2]
    args[args.index("--weight-bits") + 1] = "none"
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    out = tmp_path / "runs" / "tiny-pipeline-naive-wfpa8"
    cfg = json.loads((out / "accuquant.json").read_text())["config"]
    assert cfg["weight_bits"] is None and cfg["act_bits"] == 8 and cfg["act_symmetric"] is True
    assert (cfg["weight_granularity"], cfg["weight_init"], cfg["act_init"]) == ("tensor", "minmax", "percentile")
    assert cfg["percentile"] == 99.5 and cfg["keep_fp"] == ["conv_in"] and cfg["split_shortcut"] is False
    assert "(0 shortcut-split)" in stdout and "kept in full precision: conv_in;" not in stdout
    assert "kept in full precision: conv_in" in stdout


def test_each_command_is_its_own_module_and_main_keeps_the_contract(capsys):
    """The split CLI: one module per command (add_parser, run), none over 400 lines; main
    turns a usage error into one line and exit status 2."""
    from pathlib import Path

    import accuquant.cli as cli

    for name, module in cli.COMMANDS.items():
        assert module.__name__ == f"accuquant.cli.{name}" and callable(module.run) and callable(module.add_parser)
    for f in Path(cli.__file__).parent.glob("*.py"):
        assert len(f.read_text().splitlines()) <= 400, f.name
    code, _, err = run(capsys, "quantize", "--micro-batches", "0")
    _assert_refused(code, err)
    assert "--micro-batches: expected a positive integer" in err
