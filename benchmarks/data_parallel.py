"""Data-parallel calibration on this machine: the main job's AccuQuant phase (or the per-step
method's, capture included) on 2 ranks x 1 thread against 1 process x 1 thread and 1
process x 2 threads.

The job (``accuquant quantize``: AccuQuant, or ``--method per-step``, W4A8 on the bundled
model) runs once to fill a private cache (FP trajectories, the method's start); then each
variant runs ``--repeats`` times in turn, so that other load falls on all alike, and the
method's phase (its own work; the cached start is loaded, not rerun) is timed from the
saved model's ``timing_s``. It also checks the claim of :mod:`accuquant.calibrate.distributed`: the
2-rank model is bit-identical to one process's with ``--micro-batches 2``.

    python benchmarks/data_parallel.py --repeats 3 --iters 25   # writes results/data_parallel.{json,md}
    python benchmarks/data_parallel.py --method per-step --iters 50 --args "--act-iters 0"
                                                                 # results/data_parallel_per-step.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from common import ROOT

RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent


def run(variant: str, out: Path, cache: Path, extra: list[str]) -> dict:
    ranks, threads = {"1 process x 1 thread": (1, 1), "1 process x 2 threads": (1, 2),
                      "2 ranks x 1 thread": (2, 1)}[variant]
    env = dict(os.environ, ACCUQUANT_CACHE=str(cache), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    args = ["quantize", "--summary", "0", "--quiet", "--overwrite", "--out", str(out), *extra]
    cmd = ([str(BIN / "torchrun"), "--nproc-per-node", str(ranks), "-m", "accuquant"] if ranks > 1
           else [sys.executable, "-m", "accuquant"]) + args
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    meta = json.loads((out / "accuquant.json").read_text())
    return {"method_s": meta["timing_s"]["method"], "calibration_data_s": meta["timing_s"]["calibration_data"]}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "unet" / "accuquant_weights.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", default=None, help="a cache to fill and reuse (default: a temporary one)")
    p.add_argument("--method", default="accuquant", choices=("accuquant", "per-step"))
    p.add_argument("--iters", type=int, default=100, help="the method's iterations (default 100, AccuQuant's in the "
                   "main job)")
    p.add_argument("--args", default="", help="more arguments of accuquant quantize, e.g. '--act-iters 0'")
    p.add_argument("--out", default=None, help="default: results/data_parallel (AccuQuant), "
                   "results/data_parallel_per-step")
    args = p.parse_args()
    args.out = args.out or str(RESULTS / ("data_parallel" if args.method == "accuquant" else "data_parallel_per-step"))
    phase = "AccuQuant phase" if args.method == "accuquant" else "per-step phase (capture and iterations)"
    variants = ["1 process x 1 thread", "1 process x 2 threads", "2 ranks x 1 thread"]
    tmp = Path(tempfile.mkdtemp(prefix="accuquant-dp-"))
    try:
        cache = Path(args.cache) if args.cache else tmp / "cache"
        it = ["--method", args.method, "--iters", str(args.iters), *shlex.split(args.args)]
        run("1 process x 1 thread", tmp / "warm", cache, it)  # fills the cache: trajectories, per-step result
        times: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.repeats):
            for v in variants:
                times[v].append(run(v, tmp / v.replace(" ", "_"), cache, it))
                print(f"repeat {r}: {v}: {times[v][-1]['method_s']:.1f} s", flush=True)
        run("1 process x 1 thread", tmp / "micro", cache, [*it, "--micro-batches", "2"])
        a, b = weights(tmp / "micro"), weights(tmp / "2_ranks_x_1_thread")
        identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = statistics.median(t["method_s"] for t in times[variants[0]])
    rows = {v: {"method_s": [t["method_s"] for t in ts], "median_s": statistics.median(t["method_s"] for t in ts),
                "speedup": round(ref / statistics.median(t["method_s"] for t in ts), 3)} for v, ts in times.items()}
    name = "AccuQuant" if args.method == "accuquant" else "per-step"
    res = {"job": f"accuquant quantize (bundled mnist-ddpm, {name} W4A8, defaults but {args.iters} iterations"
                  f"{' and ' + args.args if args.args else ''}), its {phase}",
           "repeats": args.repeats, "cpus": os.cpu_count(), "torch": torch.__version__, "variants": rows,
           "two_ranks_equal_one_process_two_micro_batches": identical}
    Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=2))
    lines = [f"Written by benchmarks/data_parallel.py: {res['job']}; medians of {args.repeats} runs in turn on "
             f"{os.cpu_count()} cores; the 2-rank model is bit-identical to one process's with --micro-batches 2: "
             f"{'yes' if identical else 'NO'}.", "",
             f"| variant | {phase} (s), median | runs (s) | speed-up over 1 process x 1 thread |",
             "| --- | --- | --- | --- |"]
    for v, r in rows.items():
        lines.append(f"| {v} | {r['median_s']:.1f} | {', '.join(f'{s:.1f}' for s in r['method_s'])} | "
                     f"{r['speedup']:.2f} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
