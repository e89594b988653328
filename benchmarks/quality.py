"""Quality of quantized bundled models: every (method, bit width) pair against FP.

Each quantization runs as its own `accuquant quantize` process (its calibration wall
time and peak resident memory are measured per process); then `evaluate` scores 1,000
paired samples (DDIM 20 steps) against the FP model, whose samples are cached once.

    python benchmarks/quality.py --methods naive,per-step --bits w8a8,w4a8,w3a8,w4a6
    # writes benchmarks/results/quality.json and quality.md
    # options of learning methods pass through: --learn-args "--iters 500 --lr 0.01"
    # rows of (method, bits) pairs not run again are kept from the existing results file;
    # the file is rewritten after every row, so an interrupted run loses only the current one
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import accuquant as aq
from accuquant import bundled
from accuquant.eval.compare import CompareSettings, quantize_process
from accuquant.eval.evaluation import evaluate, to_json_safe

from common import ROOT, settings  # noqa: E402  (benchmarks/ is on the path when run)
COLS = ("fid2fp", "fid", "sfid", "is", "psnr", "ssim", "class_accuracy")


def run_quantize(method: str, w: int, a: int, out: Path, args) -> dict:
    cfg = CompareSettings(model=bundled.model_ref(bundled.DEFAULT_MODEL), methods=[method], bits=[f"w{w}a{a}"],
                          num=args.num, steps=args.steps, calib_samples=args.calib_samples, seed=args.seed)
    extra = args.learn_args.split() if method != "naive" else []
    return quantize_process(cfg, method, f"w{w}a{a}", out, quiet=True, extra=extra)


def fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "inf" if v == float("inf") else f"{v:.3f}"
    return str(v)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="naive")
    p.add_argument("--bits", default="w8a8,w4a8")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learn-args", default="", help="extra quantize flags for learning methods")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/quality"))
    args = p.parse_args()

    fp = aq.load(bundled.DEFAULT_MODEL)
    old = Path(args.out + ".json")
    kept = json.loads(old.read_text())["rows"] if old.exists() else []
    if any(r.get("num") != args.num or r.get("steps") != args.steps for r in kept):
        kept = []  # other settings: start afresh
    rows = {("fp", "fp32"): {"method": "fp", "bits": "fp32", "num": args.num, "steps": args.steps,
                             **evaluate(fp, num=args.num, steps=args.steps, progress=False)}}
    rows.update({(r["method"], r["bits"]): r for r in kept if r["method"] != "fp"})
    print(json.dumps(rows["fp", "fp32"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits.split(","):
            w, a = (int(v) for v in bits.lower().lstrip("w").split("a"))
            for method in args.methods.split(","):
                out = Path(tmp) / f"{method}-{bits}"
                cost = run_quantize(method, w, a, out, args)
                r = evaluate(aq.load(out), base=fp, num=args.num, steps=args.steps, progress=False)
                rows[method, bits] = {"method": method, "bits": bits, "num": args.num, "steps": args.steps,
                                      "learn_args": args.learn_args if method != "naive" else "", **r, **cost}
                print(json.dumps(rows[method, bits]), flush=True)
                write(rows, args)


def _order(r):
    bits_order = {"fp32": 0, "w8a8": 1, "w4a8": 2, "w3a8": 3, "w4a6": 4}
    method_order = {"fp": 0, "naive": 1, "per-step": 2, "accuquant": 3}
    return (bits_order.get(r["bits"], 9), r["bits"], method_order.get(r["method"], 9), r["method"])


def write(rows: dict, args) -> None:
    rows = sorted(rows.values(), key=_order)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"rows": [to_json_safe(r) for r in rows], "settings": settings(args),
                                                    "torch": torch.__version__}, indent=2))
    head = "| method | bits | " + " | ".join(COLS) + " | eval s | calibration s | peak RSS MB |"
    lines = [head, "|" + " --- |" * (len(COLS) + 5)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['bits']} | " + " | ".join(fmt(r[c]) for c in COLS)
                     + f" | {r['seconds']:.0f} | {fmt(r.get('calibration_s'))} | {fmt(r.get('peak_rss_mb'))} |")
    notes = sorted({f"- {r['method']}: `{r['learn_args']}`" for r in rows if r.get("learn_args")})
    Path(args.out + ".md").write_text(
        f"{args.num} paired samples, DDIM {args.steps} steps, calibration on {args.calib_samples} trajectories "
        f"(seed {args.seed}); written by benchmarks/quality.py. AccuQuant's calibration time is its own "
        "optimisation: it starts from the per-step result of the same bits and seed, taken from the cache "
        "(add the per-step row's time for a run from scratch). Learning methods run with their defaults "
        "unless listed here:\n" + ("\n".join(notes) or "- (all defaults)") + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
