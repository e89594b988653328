"""Time of the main job (``accuquant quantize`` with no method or bit options) from an empty
cache, by phase, with the quality it prints.

Each run is a fresh process with its own empty cache folder, as on a fresh machine. The
phases come from the saved model's own timing (``accuquant.json``): calibration
trajectories, the per-step initialisation, AccuQuant's optimisation; the rest of the
wall time is start-up, the naive comparison, the FP, AccuQuant and naive samples of the
quality summary, and saving.

    python benchmarks/main_job.py --repeats 3        # results/main_job.{json,md}
    python benchmarks/main_job.py --repeats 1 --label "2 threads" --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from accuquant.io.files import atomic_path
from common import ROOT

RESULTS = ROOT / "benchmarks" / "results"
SUMMARY = re.compile(r"^\s*(\w[\w-]*): fid2fp\s+([\d.]+)\s+psnr\s+([\d.]+) dB\s+ssim\s+([\d.]+)", re.M)


def run_once(threads: int | None, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, ACCUQUANT_CACHE=str(Path(tmp) / "cache"))
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        out = Path(tmp) / "model"
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "accuquant", "quantize", "--out", str(out), *extra], env=env,
                           capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"main_job.py: accuquant quantize failed ({p.returncode}): {p.stderr.strip()[-500:]}")
        meta = json.loads((out / "accuquant.json").read_text())
    log, timing = meta["method_log"], meta["timing_s"]
    init = log.get("init", {}).get("seconds", 0.0)
    quality = {m: {"fid2fp": float(f), "psnr": float(p_), "ssim": float(s)}
               for m, f, p_, s in SUMMARY.findall(p.stdout)}
    phases = {"trajectories": timing["calibration_data"], "per-step init": init,
              "accuquant": timing["method"] - init}
    phases["rest (start, naive, summary, save)"] = wall - sum(phases.values())
    return {"wall_s": round(wall, 1), "phases_s": {k: round(v, 1) for k, v in phases.items()}, "quality": quality}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="runs of the variant (0: only write the table again)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the job (default: unset)")
    p.add_argument("--label", default="default")
    p.add_argument("--args", default="", help="extra arguments of accuquant quantize, e.g. '--iters 50'")
    p.add_argument("--out", default=str(RESULTS / "main_job"))
    args = p.parse_args()
    path = Path(args.out).with_suffix(".json")
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    runs = []
    for i in range(args.repeats):
        runs.append(run_once(args.threads, args.args.split()))
        print(json.dumps(runs[-1]), flush=True)
    if runs:  # --repeats 0 only writes the table again
        row = {"label": args.label, "threads": args.threads, "args": args.args, "runs": runs,
               "median_wall_s": statistics.median(r["wall_s"] for r in runs),
               "median_phases_s": {k: statistics.median(r["phases_s"][k] for r in runs) for k in runs[0]["phases_s"]}}
        doc["rows"] = [r for r in doc["rows"] if r["label"] != args.label] + [row]
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(doc, indent=2))
    first = doc["rows"][0]
    lines = ["Written by benchmarks/main_job.py: `accuquant quantize` (AccuQuant W4A8 on the bundled model, its "
             "quality summary on 300 paired samples included) from an empty cache, a fresh process per run; "
             "median seconds over runs, by phase; quality as printed (AccuQuant and naive).", "",
             "| variant | runs | wall (s) | " + " | ".join(first["median_phases_s"]) + " | accuquant fid2fp / psnr |",
             "| --- | --- | --- | " + " | ".join("---" for _ in first["median_phases_s"]) + " | --- |"]
    for r in doc["rows"]:
        q = [x["quality"].get("accuquant", {}) for x in r["runs"]]
        qual = ", ".join(f"{x.get('fid2fp', float('nan')):.3f} / {x.get('psnr', float('nan')):.2f}" for x in q)
        lines.append(f"| {r['label']} | {len(r['runs'])} | {r['median_wall_s']:.0f} | "
                     + " | ".join(f"{r['median_phases_s'][k]:.0f}" for k in first["median_phases_s"]) + f" | {qual} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
