"""Kill and resume, stale temporaries, and two runs sharing a cache (real processes)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from accuquant.calibrate.data import Trajectories
from accuquant.io.checkpoint import checksum
from accuquant.io.files import atomic_path
from accuquant.io.safetensors import check_safetensors

#: the tiny model's AccuQuant run (benchmarks/kill_resume.py's "accuquant" job, which
#: kills and resumes it and the other jobs many more times), with a short per-step start
#: (20 s a run instead of 110 s; a kill still lands in either phase)
QUANTIZE = ["quantize", "--method", "accuquant", "--iters", "6", "--group-size", "2", "--summary", "0",
            "--weight-bits", "4", "--act-bits", "8", "--steps", "3", "--calib-samples", "4", "--batch-size", "4",
            "--init-iters", "20", "--init-act-iters", "5", "--init-samples", "2", "--quiet"]


def _command(model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "accuquant", *QUANTIZE, "--model", str(model), "--out", str(out)]


def _env(cache: Path) -> dict:
    return dict(os.environ, PYTHONWARNINGS="ignore", ACCUQUANT_CACHE=str(cache), OMP_NUM_THREADS="1")


def _weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every saved model's tensors under ``out``, by model."""
    files = sorted(out.rglob("accuquant_weights.safetensors"))
    assert files, f"no saved model under {out}"
    return {str(f.relative_to(out)): load_file(str(f)) for f in files}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[m].keys() == b[m].keys() and all(torch.equal(a[m][k], b[m][k]) for k in a[m]) for m in a)


def _leftovers(*roots: Path) -> list[str]:
    return [str(p) for r in roots if r.exists() for p in r.rglob("*") if p.name.endswith((".tmp", ".old"))]


def _kill_and_resume(model: Path, work: Path, duration: float, rng: random.Random, sig: int,
                     at_write: bool) -> dict:
    """Start the run in a fresh cache, send it ``sig`` at a random moment of its
    uninterrupted ``duration`` (``at_write``: the moment a temporary file appears in the
    cache or beside the output), then rerun it with ``--resume`` until it finishes (3
    tries). What happened, for the test to judge."""
    cache, out = work / "cache", work / "out"
    env, cmd = _env(cache), _command(model, out)
    delay = rng.uniform(0.05, 0.95) * duration
    # a background job inherits SIGINT ignored: give it the default, as a terminal's Ctrl-C finds it
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0, killed_at, when = time.perf_counter(), None, "random"
    while proc.poll() is None:
        now = time.perf_counter() - t0
        if at_write and _leftovers(cache, out.parent):
            when = "during a write"
        elif at_write or now < delay:
            time.sleep(0.002)
            continue
        proc.send_signal(sig)
        killed_at = now
        break
    _, err = proc.communicate(timeout=300)
    interrupted = killed_at is not None and proc.returncode != 0
    result = {"signal": signal.Signals(sig).name, "when": when, "planned_s": round(delay, 2),
              "killed_at_s": None if killed_at is None else round(killed_at, 2), "exit": proc.returncode,
              "interrupted": interrupted, "half_written_out": interrupted and out.exists(),
              "traceback": sig == signal.SIGINT and interrupted and "Traceback" in err}
    for resumes in range(1, 4):
        r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env)
        if r.returncode == 0:
            break
        result["last_resume_error"] = r.stderr.strip().splitlines()[-1:]
    result.update(resumes=resumes, resumed=r.returncode == 0, leftovers=_leftovers(cache, out.parent))
    result["weights"] = _weights(out) if result["resumed"] else None
    return result


@pytest.mark.slow
def test_killed_at_a_random_moment_and_during_a_write_resumes_to_the_same_model(digit_pipeline_dir, tmp_path):
    """The fast version of benchmarks/kill_resume.py: AccuQuant killed with SIGKILL at a
    random moment, and with SIGINT the moment a file is being written; each resumed run
    saves the uninterrupted run's model, bit for bit, and leaves no temporary file."""
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    r = subprocess.run(_command(digit_pipeline_dir, ref / "out"), capture_output=True, text=True,
                       env=_env(ref / "cache"))
    assert r.returncode == 0, r.stderr
    duration = time.perf_counter() - t0
    reference = _weights(ref / "out")
    rng = random.Random(0)
    for k, (sig, at_write) in enumerate([(signal.SIGKILL, False), (signal.SIGINT, True)]):
        res = _kill_and_resume(digit_pipeline_dir, tmp_path / f"t{k}", duration, rng, sig, at_write)
        weights = res.pop("weights")
        assert res["resumed"] and _same(weights, reference) and res["leftovers"] == [], res
        assert not res["half_written_out"] and not res["traceback"], res


def test_a_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    target = tmp_path / "result.safetensors"
    stale = tmp_path / f".result.safetensors.{pid}.abc123.tmp"
    live = tmp_path / f".result.safetensors.{os.getppid()}.def456.tmp"  # a live writer's: kept
    stale.write_bytes(b"half")
    live.write_bytes(b"in progress")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done" and not stale.exists() and live.exists()


@pytest.mark.slow
def test_two_runs_at_once_on_one_cache_both_succeed_and_leave_it_valid(digit_pipeline_dir, tmp_path):
    """Two quantizations of the same model with the same settings, started together on one
    cache: both finish with the same model, and every cache entry is complete and valid."""
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONWARNINGS="ignore", ACCUQUANT_CACHE=str(cache), OMP_NUM_THREADS="1")

    def cmd(out):
        return [sys.executable, "-m", "accuquant", "quantize", "--model", str(digit_pipeline_dir), "--method",
                "per-step", "--iters", "20", "--act-iters", "5", "--samples-per-step", "2", "--steps", "3",
                "--calib-samples", "4", "--weight-bits", "4", "--act-bits", "8", "--summary", "4",
                "--out", str(out), "--quiet"]

    procs = [subprocess.Popen(cmd(tmp_path / f"q{k}"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for k in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    a, b = (load_file(str(tmp_path / f"q{k}" / "unet" / "accuquant_weights.safetensors")) for k in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    entries = sorted(cache.rglob("*.safetensors"))
    assert entries and not [p for p in cache.rglob("*") if p.name.endswith((".tmp", ".old"))]
    for f in entries:
        check_safetensors(f)  # complete: every tensor the header names is there
        if f.parent.name == "calib":
            Trajectories.load(f)
        elif f.parent.name in ("runs", "results"):
            from safetensors import safe_open

            with safe_open(str(f), "pt") as h:
                md = h.metadata()
            if "sha256" in md:
                assert checksum(load_file(str(f))) == md["sha256"]


def test_compare_killed_while_writing_its_marker_reruns(tmp_path):
    """A comparison killed between creating --out and renaming its settings file into it
    leaves only a dead writer's temporary there: the same command accepts the folder."""
    from accuquant.eval.compare import CompareSettings, prepare_out

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "cmp"
    out.mkdir()
    (out / f".compare.json.{int(dead.stdout)}.x1y2.tmp").write_text("{")
    prepare_out(out, CompareSettings(model="bundled:mnist-ddpm", methods=["naive"], bits=["w4a8"]))
    assert [p.name for p in out.iterdir()] == ["compare.json"]
