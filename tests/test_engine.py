"""The calibration engine's own pieces: method configs, the optimiser, generated flags."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

import accuquant as aq
from accuquant.cache import cache_dir
from accuquant.cli import build_parser
from accuquant.calibrate.optim import Adam
from accuquant.calibrate.protocol import Group
from accuquant.methods.accuquant import AccuQuantConfig
from accuquant.methods import METHODS, method_config
from accuquant.methods.per_step import PerStepConfig
from conftest import class_pipeline


def test_method_configs_validate_round_trip_and_carry_their_version():
    cfg = AccuQuantConfig(group_size=2, grad="approx", lr=3e-3)
    d = json.loads(cfg.to_json())
    assert d["method"] == "accuquant" and d["version"] == AccuQuantConfig.VERSION and d["group_size"] == 2
    assert AccuQuantConfig.from_json(cfg.to_json()) == cfg
    assert PerStepConfig(lr=1).lr == 1.0 and isinstance(PerStepConfig(lr=1).lr, float)
    for bad, field in [({"group_size": 0}, "group_size"), ({"grad": "magic"}, "grad"), ({"lr": -1.0}, "lr"),
                       ({"iters": 2.5}, "iters"), ({"traj_batch": True}, "traj_batch"), ({"init": "x"}, "init")]:
        with pytest.raises(aq.ConfigError, match=field):
            AccuQuantConfig(**bad)
    with pytest.raises(aq.AccuQuantError, match="version 1; this accuquant has version"):
        AccuQuantConfig.from_dict({**cfg.to_dict(), "version": 1})
    with pytest.raises(aq.AccuQuantError, match="method 'per-step': unknown option.*group_size"):
        method_config("per-step", {"group_size": 2})


def test_bad_options_are_refused_before_any_work():
    """A group size below 1 is refused before the per-step initialisation runs (nothing cached)."""
    with pytest.raises(aq.ConfigError, match="group_size"):
        aq.quantize(class_pipeline(), aq.QuantConfig(weight_bits=4), "accuquant", steps=2, calib_samples=2,
                    progress=False, group_size=0)
    assert not cache_dir().exists()


def test_a_method_config_object_is_the_same_as_its_keywords():
    kw = dict(steps=2, calib_samples=2, progress=False, use_cache=False)
    cfg = aq.QuantConfig(weight_bits=4, act_bits=8)
    a = aq.quantize(class_pipeline(), cfg, "per-step", iters=3, act_iters=2, samples_per_step=1, **kw)
    b = aq.quantize(class_pipeline(), cfg, PerStepConfig(iters=3, act_iters=2, samples_per_step=1), **kw)
    assert a.quant.method_config == b.quant.method_config
    assert torch.equal(a.sample(2, steps=2, progress=False), b.sample(2, steps=2, progress=False))
    with pytest.raises(aq.AccuQuantError, match="not both"):
        aq.quantize(class_pipeline(), cfg, PerStepConfig(), iters=3, **kw)


@pytest.mark.parametrize("relative", [False, True])
def test_adam_is_torch_adam_to_the_bit(relative):
    """Plain rates and per-tensor relative rates (lr times the initial magnitude, as the
    per-step method has always used torch's Adam) give exactly torch.optim.Adam's floats."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.rand((), generator=g) + 0.1 for _ in range(3)] + ([] if relative else [torch.randn(5, generator=g)])
    ours = [p.clone().requires_grad_(True) for p in ps]
    theirs = [p.clone().requires_grad_(True) for p in ps]
    lr = 1e-2
    opt = Adam([Group({f"p{k}": p for k, p in enumerate(ours)}, lr, relative)])
    ref = torch.optim.Adam([{"params": [p], "lr": lr * (float(p.detach().abs()) if relative else 1.0)}
                            for p in theirs])
    for _ in range(20):
        grads = [torch.randn(p.shape, generator=g) for p in ps]
        for a, b, gr in zip(ours, theirs, grads):
            a.grad, b.grad = gr.clone(), gr.clone()
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_adam_relative_rates_move_each_element_by_its_own_scale():
    p = torch.tensor([1e-3, 1.0, 1e3], requires_grad=True)
    opt = Adam([Group({"s": p}, 1e-2, relative=True)])
    p.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1e-3, 1.0, 1e3]) * (1 - 1e-2), rtol=1e-5, atol=0)


#: the flags of ``accuquant quantize`` that are settings of the run, not options of a config
RUN_FLAGS = {"--model", "--method", "--correct", "--calib-samples", "--calib", "--no-cache", "--out", "--overwrite", "--summary",
             "--resume", "--micro-batches", "--max-memory", "--steps", "--scheduler", "--guidance-scale", "--labels",
             "--prompt", "--prompt-file", "--seed", "--batch-size", "--device", "--quiet", "-h", "--help"}


def _config_flags() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """``--flag`` -> the config fields it sets, as ``(config, field)``: every option marked for
    the command line of the quantization config and of each registered method's config
    (a flag is its metadata's ``flag`` or the field's name, ``_`` written ``-``)."""
    configs = [("quant config", aq.QuantConfig)] + [(name, cls.Config) for name, cls in METHODS.items()]
    flags: dict[str, list] = {}
    for owner, cfg in configs:
        for f in cfg.options():
            if f.metadata["cli"]:
                flags.setdefault("--" + (f.metadata["flag"] or f.name.replace("_", "-")), []).append((owner, f))
    return flags


def _help_entries(helptext: str) -> dict[str, str]:
    """Each option's entry in ``--help``, by its flags: its line, and its help's line under
    it when the flag is long, whitespace normalised."""
    entries, current = {}, None
    for line in helptext.splitlines():
        text = line.strip()
        if text.startswith("-"):
            current = [text]
            for flag in text.split("  ")[0].split(", "):
                entries[flag.split(" ")[0]] = current
        elif current is not None and text and line.startswith(" " * 6):
            current.append(text)
        else:
            current = None
    return {flag: " ".join(" ".join(lines).split()) for flag, lines in entries.items()}


def test_every_config_option_is_a_flag_of_quantize_and_its_help_shows_it(monkeypatch):
    """The flags of ``accuquant quantize`` are exactly the configs' command-line options and
    the run's own flags; each option's help text is in its flag's entry of ``--help``."""
    flags = _config_flags()
    assert [f.name for _, f in flags["--no-split-shortcut"]] == ["split_shortcut"]  # a flag named in the metadata
    assert {owner for owner, _ in flags["--iters"]} == {"per-step", "accuquant", "tfmq", "eda-dm"}  # one flag, four
    assert not set(flags) & RUN_FLAGS - {"--batch-size"}  # accuquant's trajectories per step share --batch-size
    quantize = build_parser()._subparsers._group_actions[0].choices["quantize"]
    assert {s for a in quantize._actions for s in a.option_strings} == set(flags) | RUN_FLAGS
    hidden = {f.name for cfg in [aq.QuantConfig, *(m.Config for m in METHODS.values())] for f in cfg.options()
              if not f.metadata["cli"]}
    assert {"save_every", "format_version"} <= hidden

    monkeypatch.setenv("COLUMNS", "1000")  # argparse's width: no line of help is wrapped
    entries = _help_entries(quantize.format_help())
    assert set(flags) <= set(entries)
    for flag, fields in flags.items():
        for owner, f in fields:
            assert " ".join(f.metadata["help"].split()) in entries[flag], (flag, owner, f.name)
    for name in hidden:  # fields not marked for the command line stay off it
        assert "--" + name.replace("_", "-") not in entries


def test_divergence_stops_where_it_starts_and_keeps_the_checkpoint(digit_pipeline_dir, tmp_path, capsys,
                                                                   monkeypatch):
    """A loss that turns non-finite at iteration 2 (forced): AccuQuant stops there with one
    line naming method, phase, iteration and quantity, writes no output, and keeps its last
    checkpoint; --resume (the fault gone) finishes."""
    import accuquant.methods.accuquant as aqm
    from accuquant.cli import main

    real, calls = aqm.multistep_backward, []

    def faulty(*a, **k):
        loss = real(*a, **k)
        calls.append(loss)
        return float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(aqm, "multistep_backward", faulty)
    args = ["quantize", "--model", str(digit_pipeline_dir), "--method", "accuquant", "--init", "naive",
            "--iters", "4", "--group-size", "2", "--batch-size", "2", "--steps", "4", "--calib-samples", "4",
            "--weight-bits", "4", "--act-bits", "8", "--out", str(tmp_path / "q"), "--quiet", "--summary", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert "accuquant" in err[0] and "iteration 2" in err[0] and "the loss (nan) is not finite" in err[0]
    assert not (tmp_path / "q").exists()  # nothing half-written
    monkeypatch.setattr(aqm, "multistep_backward", real)
    # a checkpoint damaged on the disk is refused by its checksum, not resumed from
    (ckpt,) = (Path(os.environ["ACCUQUANT_CACHE"]) / "runs").glob("*[0-9a-f].safetensors")
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[:-1] + bytes([good[-1] ^ 0x40]))
    assert main(args + ["--resume"]) == 2
    assert "do not match their checksum" in capsys.readouterr().err
    ckpt.write_bytes(good)
    assert main(args + ["--resume", "--lr", "5e-4"]) == 0  # a smaller rate continues from the checkpoint
    assert (tmp_path / "q" / "unet" / "accuquant_weights.safetensors").is_file()
    assert aq.load(tmp_path / "q").quant.method_log["resumed_at"] == {"unit": 0, "phase": 0, "iteration": 0}
