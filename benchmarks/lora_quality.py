"""A style LoRA on a quantized ``mnist-sd``: FID to FP + LoRA against the quantized model's FID to FP.

The LoRA is ``training/train_lora_thick.py``'s "thick strokes" adapter (trained here first
when ``--lora`` does not exist). ``mnist-sd`` is quantized at ``--bits`` by ``--method``
(AccuQuant by default) on ``--calib-samples`` trajectories, per calibration seed, and
scored on ``--num`` paired samples (``accuquant.eval.evaluate``):

* the quantized model against the FP model (both without the LoRA);
* the quantized model with the LoRA against the FP model with the same LoRA (the LoRA in
  floating point beside the quantized layers, on the ``fake`` backend);
* the FP model with the LoRA against the FP model: how far the style moves the samples, so
  that the two FIDs above read against it;
* ink: the mean share of a decoded digit's pixels above mid-grey, for the FP model with and
  without the LoRA and the quantized model with it (the style took if ink grows).

The target: the second FID at most 1.5x the first.

    python benchmarks/lora_quality.py --data ../data/mnist10k.npz    # results/lora_quality.{json,md}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import ROOT, cpu_name

import accuquant as aq
from accuquant.eval.evaluation import evaluate
from accuquant.io.files import atomic_path

RESULTS = ROOT / "benchmarks" / "results"
KEYS = ("fid2fp", "fid2fp_interval", "psnr", "ssim", "class_accuracy")


def ink(pipe, num: int) -> float:
    """Mean share of pixels above mid-grey in ``num`` decoded samples (images in [0, 1])."""
    with torch.no_grad():
        x = pipe.decode(pipe.sample(num, seed=123, progress=False))
    return (x > 0.5).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lora", default=str(ROOT / "runs" / "lora-thick"))
    p.add_argument("--data", default=None, help="mnist10k.npz, to train the LoRA when --lora does not exist")
    p.add_argument("--model", default="mnist-sd")
    p.add_argument("--method", default="accuquant")
    p.add_argument("--bits", default="w4a8")
    p.add_argument("--seeds", default="0")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--out", default=str(RESULTS / "lora_quality"))
    p.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json")
    args = p.parse_args()
    if args.render_only:
        render(json.loads(Path(args.out).with_suffix(".json").read_text()), Path(args.out))
        return
    if not Path(args.lora).exists():
        if not args.data:
            raise SystemExit(f"{args.lora} does not exist: pass --data to train it")
        subprocess.run([sys.executable, str(ROOT / "training" / "train_lora_thick.py"), "--data", args.data,
                        "--out", args.lora, "--model", args.model], check=True)
    fp = aq.load(args.model)
    w, a = (int(v) for v in args.bits[1:].split("a"))
    cfg = aq.QuantConfig(weight_bits=w, act_bits=a)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.perf_counter()
        q = aq.quantize(fp, cfg, args.method, steps=args.steps, calib_samples=args.calib_samples, seed=seed,
                        progress=False)
        quantize_s = time.perf_counter() - t0
        plain = evaluate(q, base=fp, num=args.num, steps=args.steps, progress=False)
        fp_l = aq.load(args.model)
        fp_l.load_lora_weights(args.lora)
        q.load_lora_weights(args.lora)
        with_lora = evaluate(q, base=fp_l, num=args.num, steps=args.steps, progress=False)
        row = {"seed": seed, "quantize_s": round(quantize_s, 1),
               "without_lora": {k: plain.get(k) for k in KEYS}, "with_lora": {k: with_lora.get(k) for k in KEYS},
               "ink_quantized_lora": ink(q, 200)}
        row["ratio"] = row["with_lora"]["fid2fp"] / row["without_lora"]["fid2fp"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    fp_l = aq.load(args.model)
    fp_l.load_lora_weights(args.lora)
    effect = evaluate(fp_l, base=fp, num=args.num, steps=args.steps, progress=False)
    doc = {"cpu": cpu_name(), "model": args.model, "method": args.method, "bits": args.bits, "num": args.num,
           "steps": args.steps, "calib_samples": args.calib_samples, "lora": Path(args.lora).name,
           "lora_effect": {k: effect.get(k) for k in KEYS}, "ink_fp": ink(fp, 200), "ink_fp_lora": ink(fp_l, 200),
           "rows": rows}
    with atomic_path(Path(args.out).with_suffix(".json")) as t:
        t.write_text(json.dumps(doc, indent=2))
    render(doc, Path(args.out))


def render(doc: dict, out: Path) -> None:
    iv = lambda r: (f"{r['fid2fp']:.3f}" + (f" ({r['fid2fp_interval'][0]:.2f}..{r['fid2fp_interval'][1]:.2f})"  # noqa: E731
                                             if r.get("fid2fp_interval") else "") + f" / {r['psnr']:.2f} dB")
    has_ink = "ink_fp" in doc
    lines = [f"Written by benchmarks/lora_quality.py on the CPU ({doc['cpu']}): {doc['model']} quantized at "
             f"{doc['bits']} by {doc['method']} ({doc['calib_samples']} calibration trajectories, {doc['steps']} "
             "steps), the \"thick strokes\" LoRA (training/train_lora_thick.py) in floating point beside the "
             f"quantized layers; {doc['num']} paired samples. FID to FP (95% bootstrap interval) / PSNR.", "",
             f"The LoRA's own effect (FP + LoRA against FP): FID {iv(doc['lora_effect'])}"
             + (f"; ink (share of pixels above mid-grey): FP {doc['ink_fp']:.3f}, FP + LoRA {doc['ink_fp_lora']:.3f}"
                if has_ink else "") + ".", "",
             "| seed | quantized vs FP | quantized + LoRA vs FP + LoRA | ratio (target at most 1.5) |"
             + (" ink, quantized + LoRA |" if has_ink else ""), "| --- " * (5 if has_ink else 4) + "|"]
    for r in doc["rows"]:
        lines.append(f"| {r['seed']} | {iv(r['without_lora'])} | {iv(r['with_lora'])} | {r['ratio']:.2f} |"
                     + (f" {r['ink_quantized_lora']:.3f} |" if has_ink else ""))
    with atomic_path(out.with_suffix(".md")) as t:
        t.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
