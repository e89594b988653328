"""Score saved quantized models on several evaluation seeds (other paired noises and labels),
to tell a difference between two models from the noise of one evaluation.

    python benchmarks/eval_seeds.py --models runs/compare-mnist-dit-seed2/models/per-step-w3a8,runs/compare-mnist-dit-seed2/models/accuquant-w3a8 \\
        --seeds 0,7,8 --num 500 --out benchmarks/results/eval_seeds_mnist-dit_w3a8_seed2.json

Writes, per model and evaluation seed, the paired metrics against the model's FP base, and
per seed the ratio of the second model's FID to FP to the first's.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

import accuquant as aq
from accuquant.eval.evaluation import evaluate

from common import ROOT  # noqa: E402  (benchmarks/ is on the path when run)

COLS = ("fid2fp", "psnr", "ssim", "class_accuracy")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", required=True, help="comma-separated accuquant output directories")
    p.add_argument("--seeds", default="0,7,8")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    models = [m for m in args.models.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for path in models:
        q = aq.load(path)
        for seed in seeds:
            r = evaluate(q, num=args.num, seed=seed, progress=False)
            rows.append({"model": os.path.relpath(Path(path).resolve(), ROOT), "seed": seed,
                         **{c: r[c] for c in COLS}})
            print(json.dumps(rows[-1]), flush=True)
    ratios = {}
    if len(models) == 2:
        by = {(r["model"], r["seed"]): r for r in rows}
        a, b = (os.path.relpath(Path(m).resolve(), ROOT) for m in models)
        ratios = {s: by[b, s]["fid2fp"] / by[a, s]["fid2fp"] for s in seeds}
    Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows, "fid2fp_ratio_second_to_first": ratios,
                                          "torch": torch.__version__}, indent=2))
    print(json.dumps({"ratios": ratios}))


if __name__ == "__main__":
    main()
