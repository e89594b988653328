"""FP quality of a bundled model: class accuracy, FID, sFID and IS of generated digits.

1. A guidance sweep on a smaller sample (class accuracy and FID per guidance scale).
2. At the model's default guidance: 1,000 samples (100 per class: balanced labels, or the
   text model's fixed prompt list, each prompt asking for one digit), DDIM 20 steps,
   against the 1,000 held-out digits; the FID floor (training split vs held-out) from the
   classifier's reference file. Class accuracy: the bundled classifier's reading of each
   sample against the class it was asked for.
3. A 10 x 10 grid (a column per class, a row per seed) for the README.

    python benchmarks/fp_quality.py                       # mnist-ddpm: results/fp_quality.json, docs/fp_samples.png
    python benchmarks/fp_quality.py --model mnist-sd      # results/fp_quality_mnist-sd.json, docs/fp_samples_mnist-sd.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import accuquant as aq
from accuquant import bundled
from accuquant.eval.evaluation import DigitFeatures
from accuquant.eval.images import save_grid
from accuquant.eval.metrics import fid_from_features, inception_score

ROOT = Path(__file__).resolve().parent.parent


def score(pipe, feats, f_real, num, steps, guidance, seed=0):
    t0 = time.perf_counter()
    labels = pipe.class_labels(num)  # balanced, or the default prompts' digits
    x = pipe.sample(num, seed=seed, steps=steps, guidance_scale=guidance, batch_size=100, progress=False)
    seconds = time.perf_counter() - t0
    f = feats(pipe.decode(x))
    return {
        "guidance_scale": guidance,
        "num": num,
        "steps": steps,
        "class_accuracy": (f["logits"].argmax(1) == labels).float().mean().item(),
        "fid": fid_from_features(f["pool"], f_real["pool"]),
        "sfid": fid_from_features(f["spatial"], f_real["spatial"]),
        "is": inception_score(f["logits"]),
        "sampling_seconds": round(seconds, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sweep", default="1.0,1.5,2.0,3.0")
    p.add_argument("--sweep-num", type=int, default=300)
    p.add_argument("--model", default="mnist-ddpm", choices=bundled.MODELS)
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/fp_quality[_MODEL].json)")
    p.add_argument("--grid", default=None, help="sample grid (default docs/fp_samples[_MODEL].png)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    suffix = "" if args.model == bundled.MODELS[0] else f"_{args.model}"
    args.out = args.out or str(ROOT / f"benchmarks/results/fp_quality{suffix}.json")
    args.grid = args.grid or str(ROOT / f"docs/fp_samples{suffix}.png")
    torch.set_num_threads(args.threads)
    pipe = aq.load(args.model)
    feats = DigitFeatures()
    real, _ = bundled.heldout()
    f_real = feats(real)
    sweep = []
    for g in [float(v) for v in args.sweep.split(",") if v]:
        sweep.append(score(pipe, feats, f_real, args.sweep_num, args.steps, g, seed=1))
        print(json.dumps(sweep[-1]), flush=True)
    main_row = score(pipe, feats, f_real, args.num, args.steps, pipe.defaults.guidance_scale)
    print(json.dumps(main_row), flush=True)
    ref = json.loads((bundled.CLASSIFIER / "reference.json").read_text())
    training = json.loads((bundled.ASSETS / args.model / "training.json").read_text())
    result = {
        "model": f"bundled {args.model}",
        "parameters": sum(t.numel() for t in pipe.model.parameters()),
        "scheduler": pipe.sampling_settings(args.steps, None)[1],  # the model's default sampler
        "fp": main_row,
        "fid_floor_train_vs_heldout": ref["fid_train_vs_heldout"],
        "fid_floor_train1000_vs_heldout": ref["fid_train1000_vs_heldout"],
        "classifier_heldout_accuracy": ref["heldout_accuracy"],
        "guidance_sweep": sweep,
        "training": {k: training[k] for k in ("epochs_done", "iterations", "seconds", "final_epoch_loss")},
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    # row r, column c: seed-noise r*10+c of class c (the text model: its prompts of the first template)
    x = pipe.sample(100, seed=0, steps=args.steps, batch_size=100, progress=False,
                    **({"prompts": pipe.defaults.prompts[:10]} if pipe.defaults.prompts else {}))
    Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
    save_grid(pipe.decode(x), args.grid, nrow=10)
    print(f"wrote {args.out} and {args.grid}")


if __name__ == "__main__":
    main()
