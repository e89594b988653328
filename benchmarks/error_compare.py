"""Error accumulation of per-step and AccuQuant calibration on one plot (bundled model).

Both methods quantize the bundled model at the same bits from the same calibration data
(AccuQuant starts from the per-step result, computed once); then, along paired
trajectories from the same noises, the per-step error ``||eps~(x_t) - eps(x_t)||`` on FP
inputs and the accumulated error ``||x~_t - x_t||`` are measured per sampling step, with
FID2FP of the predicted x0 at a few steps.

    python benchmarks/error_compare.py --bits w4a8 --num 500
    # writes benchmarks/results/error_<bits>_compare.csv and docs/error_<bits>_compare.png
    # AccuQuant options pass through: --accuquant-args "group_size=4,iters=200"
"""

from __future__ import annotations

import argparse
import csv

import accuquant as aq
from accuquant import bundled
from accuquant.analysis import error_accumulation, plot

from common import ROOT, parse_options


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bits", default="w4a8")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--accuquant-args", default="", help="key=value,... options of the accuquant method")
    args = p.parse_args()
    w, a = (int(v) for v in args.bits.lower().lstrip("w").split("a"))
    cfg = aq.QuantConfig(weight_bits=w, act_bits=a)
    opts = parse_options(args.accuquant_args)
    fp = aq.load(bundled.DEFAULT_MODEL)
    common = dict(steps=args.steps, calib_samples=args.calib_samples, seed=args.seed, progress=False)
    models = {
        "per-step": aq.quantize(fp, cfg, "accuquant", init="per-step", iters=0, **common),  # per-step's result
        "accuquant": aq.quantize(fp, cfg, "accuquant", **common, **opts),
    }
    curves = {f"{name} {args.bits.upper()}": error_accumulation(q, fp, num=args.num, steps=args.steps, seed=args.seed,
                                                                progress=False)
              for name, q in models.items()}
    stem = f"error_{args.bits}_compare"
    plot(curves, ROOT / "docs" / f"{stem}.png", title=f"bundled model, {args.num} paired trajectories, "
                                                      f"DDIM {args.steps} steps")
    out = ROOT / "benchmarks" / "results" / f"{stem}.csv"
    with open(out, "w", newline="") as f:
        cols = list(next(iter(curves.values()))[0])
        wr = csv.writer(f)
        wr.writerow(["model", *cols])
        for name, rows in curves.items():
            for r in rows:
                wr.writerow([name, *(r[c] for c in cols)])
    for name, rows in curves.items():
        print(f"{name}: accumulated error at the last step {rows[-1]['accumulated_error']:.4f}")


if __name__ == "__main__":
    main()
