"""Kill and resume, stale temporaries, and two runs sharing a cache (real processes)."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from accuquant.calibrate.data import Trajectories
from accuquant.io.checkpoint import checksum
from accuquant.io.files import atomic_path, check_safetensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kill_resume  # noqa: E402


def test_killed_at_a_random_moment_and_during_a_write_resumes_to_the_same_model(tmp_path):
    """The fast version of benchmarks/kill_resume.py: AccuQuant killed with SIGKILL at a
    random moment, and with SIGINT the moment a file is being written; each resumed run
    saves the uninterrupted run's model, bit for bit, and leaves no temporary file."""
    model = kill_resume.build_model(tmp_path / "model")
    job = "accuquant"
    ref = tmp_path / "ref"
    env = dict(os.environ, PYTHONWARNINGS="ignore", ACCUQUANT_CACHE=str(ref / "cache"), OMP_NUM_THREADS="1")
    import time

    t0 = time.perf_counter()
    r = kill_resume.run(kill_resume.command(job, model, ref / "out"), env)
    assert r.returncode == 0, r.stderr
    duration = time.perf_counter() - t0
    reference = kill_resume.weights(job, ref / "out")
    rng = random.Random(0)
    for k, (sig, at_write) in enumerate([(signal.SIGKILL, False), (signal.SIGINT, True)]):
        res = kill_resume.trial(job, model, tmp_path / f"t{k}", reference, duration, rng, sig, at_write)
        assert res["identical"] and res["leftovers"] == [], res
        assert not res.get("half_written_out") and "traceback" not in res, res


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
