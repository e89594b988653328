"""Quantization of a bundled model (``mnist-sd``, ``mnist-dit``, ...): every method at the
given bit widths through ``accuquant compare``, one comparison per calibration seed, kept as
results files, with a table for the README.

    python benchmarks/families.py --model mnist-sd --bits w4a8,w3a8 --seeds 0 --num 300
    python benchmarks/families.py --name neighbours --model mnist-dit --bits w4a8,w3a8 --seeds 0,1,2 \
        --methods naive,per-step,ptqd,accuquant,accuquant+ptqd

For each seed it runs (or resumes: finished pairs are kept) ``accuquant compare --model M
--seed S --out runs/NAME-M-seedS``, copies its ``results.json`` (with the CPU's name) to
``benchmarks/results/NAME_M_seedS.json`` (for ``--name compare``, the default, also its sample
grids and error plots to ``docs/compare/M/``), then writes ``benchmarks/results/NAME_M.md``
from every seed file of that model present: per seed and pair the paired metrics against FP
(FID with its bootstrap interval, PSNR, the accumulated error at the last step),
calibration time and peak memory, and the FID to FP as a ratio of per-step's; with several
seeds, their mean and range.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from common import ROOT, cpu_name  # noqa: E402  (benchmarks/ is on the path when run)

RESULTS = ROOT / "benchmarks" / "results"
COLS = ("fid2fp", "psnr", "ssim", "class_accuracy")


def run_seed(args, seed: int) -> Path:
    out = ROOT / "runs" / f"{args.name}-{args.model}-seed{seed}"
    cmd = [sys.executable, "-m", "accuquant", "compare", "--model", args.model, "--methods", args.methods,
           "--bits", args.bits, "--num", str(args.num), "--analyze-num", str(args.analyze_num),
           "--seed", str(seed), "--out", str(out)]
    subprocess.run(cmd, check=True)
    res = {**json.loads((out / "results.json").read_text()), "cpu": cpu_name()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}_{args.model}_seed{seed}.json").write_text(json.dumps(res, indent=2))
    if args.name != "compare":
        return out
    docs = ROOT / "docs" / "compare" / args.model
    docs.mkdir(parents=True, exist_ok=True)
    for bits in res["settings"]["bits"]:
        shutil.copyfile(out / f"grid-{bits}.png", docs / f"grid-{bits}-seed{seed}.png")
        shutil.copyfile(out / f"errors-{bits}.png", docs / f"errors-{bits}-seed{seed}.png")
    return out


def _fid(m: dict) -> str:
    lo_hi = m.get("fid2fp_interval")
    return f"{m['fid2fp']:.3f}" + (f" ({lo_hi[0]:.3f}..{lo_hi[1]:.3f})" if lo_hi else "")


def _final_error(r: dict) -> str:
    errors = r.get("errors") or []
    return f"{errors[-1]['accumulated_error']:.3f}" if errors else ""


def table(model: str, name: str = "compare") -> str:
    files = sorted(RESULTS.glob(f"{name}_{model}_seed*.json"))
    seeds = [json.loads(f.read_text()) for f in files]
    if not seeds:
        return ""
    s0 = seeds[0]["settings"]
    cpus = sorted({s.get("cpu", "not recorded") for s in seeds})
    lines = [f"{model}: {s0['num']} paired samples, {s0['scheduler'].upper()} {s0['steps']} steps, "
             f"{s0['calib_samples']} calibration trajectories; seeds {', '.join(str(s['settings']['seed']) for s in seeds)}"
             f"; FP: class accuracy {seeds[0]['fp']['class_accuracy']:.3f}. CPU: {'; '.join(cpus)}. "
             f"Command: `python benchmarks/families.py --name {name} --model {model} --methods "
             f"{','.join(s0['methods'])} --bits {','.join(s0['bits'])} --num {s0['num']}`.", "",
             "| bits | method | seed | FID to FP (95% interval) | PSNR (dB) | SSIM | class acc. | accumulated error, "
             "last step | calibration (s) | peak RSS (MB) | FID to FP / per-step's |", "|" + " --- |" * 11]
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
                lines.append(f"| {bits} | {method} | {res['settings']['seed']} | {_fid(m)} | {m['psnr']:.2f} | "
                             f"{m['ssim']:.4f} | {m['class_accuracy']:.3f} | {_final_error(r)} | "
                             f"{c['calibration_s']:.0f} | {c['peak_rss_mb']:.0f} | {ratio} |")
    if len(seeds) > 1:
        lines += ["", "| bits | method: mean (min..max) over seeds | " + " | ".join(COLS)
                  + " | FID to FP / per-step's |", "|" + " --- |" * (len(COLS) + 3)]

        def metrics(s, method, bits):
            return next((r["metrics"] for r in s["runs"] if r["method"] == method and r["bits"] == bits), None)

        def spread(v):
            return f"{statistics.fmean(v):.3f} ({min(v):.3f}..{max(v):.3f})"

        for bits in s0["bits"]:
            for method in s0["methods"]:
                per = [metrics(s, method, bits) for s in seeds]
                if any(p is None for p in per):
                    continue
                cells = [spread([p[c] for p in per]) for c in COLS]
                base = [metrics(s, "per-step", bits) for s in seeds]
                ratio = spread([p["fid2fp"] / b["fid2fp"] for p, b in zip(per, base)]) \
                    if method != "per-step" and all(base) else ""
                lines.append(f"| {bits} | {method} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--name", default="compare", help="results prefix: compare (default) or neighbours")
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
    text = table(args.model, args.name)
    (RESULTS / f"{args.name}_{args.model}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
