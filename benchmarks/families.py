"""Quantization of a bundled latent model (``mnist-sd``, ``mnist-dit``): every method at the
given bit widths through ``accuquant compare``, one comparison per calibration seed, kept as
results files, with a table for the README.

    python benchmarks/families.py --model mnist-sd --bits w4a8,w3a8 --seeds 0 --num 300

For each seed it runs (or resumes: finished pairs are kept) ``accuquant compare --model M
--seed S --out runs/compare-M-seedS``, copies its ``results.json`` to
``benchmarks/results/compare_M_seedS.json`` and its sample grids and error plots to ``docs/compare/M/``, then
writes ``benchmarks/results/compare_M.md`` from every seed file of that model present:
per seed and pair the paired metrics against FP, calibration time and peak memory, and
AccuQuant's FID to FP as a ratio of per-step's; with several seeds, their mean and range.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from common import ROOT  # noqa: E402  (benchmarks/ is on the path when run)

RESULTS = ROOT / "benchmarks" / "results"
COLS = ("fid2fp", "psnr", "ssim", "class_accuracy")


def run_seed(args, seed: int) -> Path:
    out = ROOT / "runs" / f"compare-{args.model}-seed{seed}"
    cmd = [sys.executable, "-m", "accuquant", "compare", "--model", args.model, "--methods", args.methods,
           "--bits", args.bits, "--num", str(args.num), "--analyze-num", str(args.analyze_num),
           "--seed", str(seed), "--out", str(out)]
    subprocess.run(cmd, check=True)
    res = json.loads((out / "results.json").read_text())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"compare_{args.model}_seed{seed}.json").write_text(json.dumps(res, indent=2))
    docs = ROOT / "docs" / "compare" / args.model
    docs.mkdir(parents=True, exist_ok=True)
    for bits in res["settings"]["bits"]:
        shutil.copyfile(out / f"grid-{bits}.png", docs / f"grid-{bits}-seed{seed}.png")
        shutil.copyfile(out / f"errors-{bits}.png", docs / f"errors-{bits}-seed{seed}.png")
    return out


def table(model: str) -> str:
    files = sorted(RESULTS.glob(f"compare_{model}_seed*.json"))
    seeds = [json.loads(f.read_text()) for f in files]
    if not seeds:
        return ""
    s0 = seeds[0]["settings"]
    lines = [f"{model}: {s0['num']} paired samples, {s0['scheduler'].upper()} {s0['steps']} steps, "
             f"{s0['calib_samples']} calibration trajectories; seeds {', '.join(str(s['settings']['seed']) for s in seeds)}"
             f"; FP: class accuracy {seeds[0]['fp']['class_accuracy']:.3f}.", "",
             "| bits | method | seed | FID to FP | PSNR (dB) | SSIM | class acc. | calibration (s) | peak RSS (MB) "
             "| FID to FP / per-step's |", "|" + " --- |" * 10]
    for res in seeds:
        runs = {(r["method"], r["bits"]): r for r in res["runs"]}
        for bits in res["settings"]["bits"]:
            for method in res["settings"]["methods"]:
                r = runs.get((method, bits))
                if r is None:
                    continue
                m, c = r["metrics"], r["cost"]
                per = runs.get(("per-step", bits))
                ratio = f"{m['fid2fp'] / per['metrics']['fid2fp']:.2f}" if per and method != "per-step" else ""
                lines.append(f"| {bits} | {method} | {res['settings']['seed']} | {m['fid2fp']:.3f} | {m['psnr']:.2f} | "
                             f"{m['ssim']:.4f} | {m['class_accuracy']:.3f} | {c['calibration_s']:.0f} | "
                             f"{c['peak_rss_mb']:.0f} | {ratio} |")
    if len(seeds) > 1:
        lines += ["", "| bits | method: mean (min..max) over seeds | " + " | ".join(COLS) + " |",
                  "|" + " --- |" * (len(COLS) + 2)]
        for bits in s0["bits"]:
            for method in s0["methods"]:
                per = [next((r["metrics"] for r in s["runs"] if r["method"] == method and r["bits"] == bits), None)
                       for s in seeds]
                if any(p is None for p in per):
                    continue
                cells = [f"{statistics.fmean(v):.3f} ({min(v):.3f}..{max(v):.3f})"
                         for v in ([p[c] for p in per] for c in COLS)]
                lines.append(f"| {bits} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--methods", default="naive,per-step,accuquant")
    p.add_argument("--bits", default="w8a8,w4a8,w3a8")
    p.add_argument("--seeds", default="0")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--analyze-num", type=int, default=64)
    p.add_argument("--table-only", action="store_true", help="only rewrite the table from the results files")
    args = p.parse_args()
    if not args.table_only:
        for seed in [int(s) for s in args.seeds.split(",") if s]:
            run_seed(args, seed)
    text = table(args.model)
    (RESULTS / f"compare_{args.model}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
