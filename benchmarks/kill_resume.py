"""Killed anywhere, resumed to the same model: the kill-and-resume harness.

For each job (``accuquant quantize`` with per-step and with accuquant, and ``accuquant
compare``) on a tiny class-conditional model built here, it runs the job once without
interruption, then ``--trials`` times: starts it in a fresh cache, kills it (SIGKILL or
SIGINT, alternately) at a random moment of its run, or the moment a temporary file appears
in the cache or beside the output (a checkpoint or a result being written), reruns it
(``--resume``; ``compare``: the same command) until it finishes, and checks that

* the saved model's weights are bit-identical to the uninterrupted run's (every tensor),
* no temporary file is left in the output's folder or the cache, and
* an interrupted run left no ``--out`` behind (outputs appear complete or not at all).

    python benchmarks/kill_resume.py --trials 10      # writes benchmarks/results/kill_resume.json

``tests/test_reliability.py`` runs two trials of one job as the fast version.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import torch
from safetensors.torch import load_file

from accuquant.io.files import atomic_path

ROOT = Path(__file__).resolve().parents[1]

#: the tiny model's quantization, shared by every job: 3 DDIM steps, 4 trajectories
COMMON = ["--weight-bits", "4", "--act-bits", "8", "--steps", "3", "--calib-samples", "4", "--batch-size", "4",
          "--quiet"]
JOBS = {
    "per-step": ["quantize", "--method", "per-step", "--iters", "40", "--act-iters", "10", "--samples-per-step", "2",
                 "--summary", "0", *COMMON],
    "accuquant": ["quantize", "--method", "accuquant", "--iters", "6", "--group-size", "2", "--summary", "0",
                  *COMMON],
    # naive at two bit widths: the comparison's own machinery (pairs, FP samples, analysis, report)
    "compare": ["compare", "--methods", "naive", "--bits", "w4a8,w8a8", "--num", "8", "--analyze-num", "4",
                "--steps", "3", "--calib-samples", "4", "--quiet"],
}


def build_model(path: Path) -> Path:
    """A 28x28 class-conditional UNet (10 classes and a null class) as a DDIM pipeline."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=11)
    sched = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    diffusers.DDIMPipeline(unet=unet, scheduler=sched).save_pretrained(str(path))
    (path / "accuquant_sampling.json").write_text(json.dumps({"guidance_scale": 2.0, "num_classes": 10,
                                                              "null_class": 10}))
    return path


def command(job: str, model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "accuquant", *JOBS[job], "--model", str(model), "--out", str(out)]


def weights(job: str, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every saved model's tensors under ``out``, by model."""
    files = sorted(out.rglob("accuquant_weights.safetensors"))
    if not files:
        raise RuntimeError(f"{job}: no saved model under {out}")
    return {str(f.relative_to(out)): load_file(str(f)) for f in files}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[m].keys() == b[m].keys() and all(torch.equal(a[m][k], b[m][k]) for k in a[m]) for m in a)


def leftovers(*roots: Path) -> list[str]:
    return [str(p) for r in roots if r.exists() for p in r.rglob("*") if p.name.endswith((".tmp", ".old"))]


def run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
    # a background job inherits SIGINT ignored: give it the default, as a terminal's Ctrl-C finds it
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def trial(job: str, model: Path, work: Path, reference: dict, duration: float, rng: random.Random,
          sig: int, at_write: bool) -> dict:
    """One kill (at a random moment, or when a temporary file appears) and the resumes after it."""
    cache, out = work / "cache", work / "out"
    env = dict(os.environ, PYTHONWARNINGS="ignore", ACCUQUANT_CACHE=str(cache), OMP_NUM_THREADS="1")
    cmd = command(job, model, out)
    resume = cmd + (["--resume"] if job != "compare" else [])
    delay = rng.uniform(0.05, 0.95) * duration
    proc, t0, killed_at, when = _start(cmd, env), time.perf_counter(), None, "random"
    while proc.poll() is None:
        now = time.perf_counter() - t0
        if at_write and leftovers(cache, out.parent if job != "compare" else out):
            when = "during a write"
        elif at_write or now < delay:
            time.sleep(0.002)
            continue
        proc.send_signal(sig)
        killed_at = now
        break
    _, err = proc.communicate(timeout=300)
    interrupted = killed_at is not None and proc.returncode != 0
    result = {"job": job, "signal": signal.Signals(sig).name, "when": when, "planned_s": round(delay, 2),
              "killed_at_s": None if killed_at is None else round(killed_at, 2), "exit": proc.returncode,
              "interrupted": interrupted}
    if interrupted and job != "compare" and out.exists():
        result["half_written_out"] = True
    if sig == signal.SIGINT and interrupted and "Traceback" in err:
        result["traceback"] = err.strip().splitlines()[-1]
    resumes = 0
    while True:
        r = run(resume, env)
        resumes += 1
        if r.returncode == 0:
            break
        if resumes >= 3:
            result["resume_failed"] = r.stderr.strip().splitlines()[-1:]
            return result
    result["resumes"] = resumes
    result["identical"] = same(weights(job, out), reference)
    result["leftovers"] = leftovers(cache, out.parent if job != "compare" else out)
    result["ok"] = (result["identical"] and not result["leftovers"] and not result.get("half_written_out")
                    and "traceback" not in result)
    return result


def check_job(job: str, model: Path, root: Path, trials: int, seed: int, log=print) -> dict:
    """The uninterrupted run, then ``trials`` killed-and-resumed ones; a summary and every trial."""
    ref_dir = root / f"{job}-reference"
    env = dict(os.environ, PYTHONWARNINGS="ignore", ACCUQUANT_CACHE=str(ref_dir / "cache"), OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    r = run(command(job, model, ref_dir / "out"), env)
    duration = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{job}: the uninterrupted run failed: {r.stderr.strip()[-500:]}")
    reference = weights(job, ref_dir / "out")
    rng = random.Random(seed)
    results = []
    for k in range(trials):
        sig = signal.SIGKILL if k % 2 == 0 else signal.SIGINT
        at_write = k % 5 == 4  # every fifth trial: the moment a file is being written
        res = trial(job, model, root / f"{job}-{k}", reference, duration, rng, sig, at_write)
        results.append(res)
        log(json.dumps(res))
    good = sum(bool(x.get("ok")) for x in results)
    return {"job": job, "uninterrupted_s": round(duration, 1), "trials": trials, "identical": good,
            "interrupted": sum(x["interrupted"] for x in results), "results": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--jobs", default=",".join(JOBS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/kill_resume.json"))
    args = p.parse_args()
    out = Path(args.out)
    done = {j["job"]: j for j in json.loads(out.read_text())["jobs"]} if out.exists() else {}
    summary = []
    with tempfile.TemporaryDirectory(prefix="accuquant-kill-") as tmp:
        model = build_model(Path(tmp) / "model")
        for job in args.jobs.split(","):  # written after each job (other jobs' earlier results kept)
            summary.append(check_job(job, model, Path(tmp), args.trials, args.seed))
            done[job] = summary[-1]
            doc = {"jobs": [done[j] for j in JOBS if j in done], "torch": torch.__version__, "seed": args.seed}
            with atomic_path(out) as tmp_out:
                tmp_out.write_text(json.dumps(doc, indent=2))
    for s in summary:
        print(f"{s['job']}: {s['identical']}/{s['trials']} bit-identical after kill and resume "
              f"({s['interrupted']} interrupted; uninterrupted run {s['uninterrupted_s']} s)")


if __name__ == "__main__":
    main()
