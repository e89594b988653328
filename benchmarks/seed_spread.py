"""Spread of the main job's result over calibration seeds.

For each seed, ``accuquant quantize --seed S --summary 0`` (AccuQuant W4A8 on the bundled
model unless ``--args`` says otherwise) and then ``accuquant evaluate`` of the saved model
against its FP base on 300 paired samples with evaluation seed 0, so that only the
calibration (its trajectories, batches and rounding) differs between seeds. Jobs run
``--jobs`` at a time with ``OMP_NUM_THREADS=1`` each; the user's cache is shared, so a
variant that changes only AccuQuant's phase reuses each seed's trajectories and per-step
start.

    python benchmarks/seed_spread.py --seeds 0,1,2,3,4 --label default       # results/seed_spread.{json,md}
    python benchmarks/seed_spread.py --label per-step --args "--method per-step"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from accuquant.io.files import atomic_path
from common import ROOT

RESULTS = ROOT / "benchmarks" / "results"
COLS = ("fid2fp", "psnr", "ssim", "class_accuracy")


def one_seed(seed: int, label: str, extra: list[str], num: int, runs: Path) -> dict:
    out = runs / label.replace(" ", "_") / f"seed{seed}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    q = subprocess.run([sys.executable, "-m", "accuquant", "quantize", "--seed", str(seed), "--summary", "0",
                        "--out", str(out), "--overwrite", "--quiet", *extra], env=env, capture_output=True, text=True)
    if q.returncode != 0:
        raise SystemExit(f"seed_spread.py: quantize --seed {seed} failed: {q.stderr.strip()[-500:]}")
    e = subprocess.run([sys.executable, "-m", "accuquant", "evaluate", "--model", str(out), "--num", str(num),
                        "--seed", "0", "--json", "--quiet"], env=env, capture_output=True, text=True)
    if e.returncode != 0:
        raise SystemExit(f"seed_spread.py: evaluate of seed {seed} failed: {e.stderr.strip()[-500:]}")
    r = json.loads(e.stdout.strip().splitlines()[-1])
    meta = json.loads((out / "accuquant.json").read_text())
    row = {"seed": seed, **{k: r[k] for k in COLS}, "method_s": round(meta["timing_s"]["method"], 1)}
    print(json.dumps({"label": label, **row}), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--label", default="default")
    p.add_argument("--args", default="", help="extra arguments of accuquant quantize, e.g. '--iters 50'")
    p.add_argument("--num", type=int, default=300, help="paired evaluation samples (default 300)")
    p.add_argument("--jobs", type=int, default=2, help="seeds run at once, one thread each (default 2)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "seed_spread"), help="where the models are written")
    p.add_argument("--out", default=str(RESULTS / "seed_spread"))
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda s: one_seed(s, args.label, shlex.split(args.args), args.num, Path(args.runs)),
                             seeds))
    path = Path(args.out).with_suffix(".json")
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    doc["rows"] = [r for r in doc["rows"] if r["label"] != args.label] + [
        {"label": args.label, "args": args.args, "num": args.num, "seeds": rows}]
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2))
    lines = ["Written by benchmarks/seed_spread.py: the model quantized with each calibration seed (one thread "
             "per job), scored against FP on the same paired samples (evaluation seed 0); median and range "
             "over seeds.", "",
             "| variant | quantize arguments | seeds | fid2fp median (min to max) | psnr median (min to max) | "
             "fid2fp per seed |", "| --- | --- | --- | --- | --- | --- |"]
    for r in doc["rows"]:
        f = [x["fid2fp"] for x in r["seeds"]]
        ps = [x["psnr"] for x in r["seeds"]]
        lines.append(f"| {r['label']} | `{r['args'] or '(defaults)'}` | {len(f)} | {statistics.median(f):.3f} "
                     f"({min(f):.3f} to {max(f):.3f}) | {statistics.median(ps):.2f} ({min(ps):.2f} to {max(ps):.2f}) "
                     f"| {', '.join(f'{x:.3f}' for x in f)} |")
    with atomic_path(path.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
