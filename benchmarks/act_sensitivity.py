"""Which layer inputs 4-bit activations hurt: each layer's input alone at 4 bits.

The measure is the one ``--act-mixed-precision`` allocates by (:func:`accuquant.calibrate.mixed.sensitivities`):
the multistep loss (AccuQuant's, groups of 4 steps from the stored FP states, 8 calibration
trajectories) with one layer's input quantized per token and dynamically at 4 bits and every
other tensor in FP. No outlier handling: this shows where the range problem is before
smoothing and the branch. Writes ``benchmarks/results/act_sensitivity_<model>.{md,json}``:
the share of the summed rise by kind of layer (conv or linear) and by block, and the top layers.

    python benchmarks/act_sensitivity.py --model mnist-sd
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from torch import nn

from common import ROOT, cpu_name

import accuquant as aq
from accuquant.api import calibration_data
from accuquant.calibrate.mixed import candidate_layers, sensitivities


def _block(name: str) -> str:
    """The block a layer belongs to: the name up to its first numbered part's end."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return parts[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mnist-sd")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--render", action="store_true", help="only rewrite the table from the results file")
    args = p.parse_args()
    if args.render:
        return render(ROOT / "benchmarks" / "results" / f"act_sensitivity_{args.model}", args.top)
    pipe = aq.load(args.model)
    solver = pipe.solver(20)
    den = pipe.denoiser()
    calib = calibration_data(pipe, solver, args.calib_samples, 0, None, pipe.conditions(args.calib_samples),
                             16, "cpu", False)
    config = den.resolve(aq.QuantConfig(weight_bits=4, act_bits=4, act_granularity="token"))
    splits = den.shortcut_splits() if config.split_shortcut else {}
    sens = sensitivities(den, solver, calib, config, splits, kind="act", progress=False)
    layers = candidate_layers(den.model, config)
    rise = {n: max(s[4] - s[8], 0.0) for n, s in sens.items()}
    total = sum(rise.values()) or 1.0
    kind = {n: "conv" if isinstance(m, (nn.Conv1d, nn.Conv2d)) else "linear" for n, m in layers.items()}
    by_kind, by_block = defaultdict(float), defaultdict(float)
    for n, r in rise.items():
        by_kind[kind[n]] += r / total
        by_block[_block(n)] += r / total
    out = {"model": args.model, "cpu": cpu_name(), "layers": len(rise), "loss_fp8": {n: s[8] for n, s in sens.items()},
           "rise_at_4": rise, "share_by_kind": dict(by_kind), "share_by_block": dict(by_block),
           "count_by_kind": {k: sum(1 for n in rise if kind[n] == k) for k in ("conv", "linear")}}
    out["kind"], out["split"] = kind, sorted(splits)
    path = ROOT / "benchmarks" / "results" / f"act_sensitivity_{args.model}"
    path.with_suffix(".json").write_text(json.dumps(out, indent=2))
    render(path, args.top)


def render(path, top_n: int) -> None:
    """The table of ``path``.json into ``path``.md."""
    out = json.loads(path.with_suffix(".json").read_text())
    rise, kind, by_kind = out["rise_at_4"], out["kind"], out["share_by_kind"]
    total = sum(rise.values()) or 1.0
    top = sorted(rise, key=rise.get, reverse=True)[:top_n]
    split = set(out.get("split", ()))
    lines = [f"Layer inputs at 4 bits on {out['model']}, one at a time (per token, dynamic; weights and every other "
             "input in FP; no outlier handling): the rise of the multistep loss over the same input at 8 bits, "
             f"8 calibration trajectories, groups of 4 steps. CPU: {out['cpu']}. Written by "
             "benchmarks/act_sensitivity.py. 'split': a shortcut-split conv (a concatenated input), each part on "
             "its own grid, as the quantized model has them.", "",
             "| kind | layers | share of the summed rise |", "| --- | --- | --- |"]
    lines += [f"| {k} | {out['count_by_kind'][k]} | {by_kind.get(k, 0.0):.1%} |" for k in ("conv", "linear")]
    lines += ["", f"Summed rise over the {len(rise)} layers: {total:.3g} (multistep loss at 8 bits, mean over the "
              f"layers: {sum(out['loss_fp8'].values()) / len(rise):.3g}).", "",
              "| block | share |", "| --- | --- |"]
    lines += [f"| {b} | {v:.1%} |" for b, v in sorted(out["share_by_block"].items(), key=lambda x: -x[1])]
    lines += ["", "| layer | kind | rise | share |", "| --- | --- | --- | --- |"]
    lines += [f"| {n} | {kind[n]}{', split' if n in split else ''} | {rise[n]:.3g} | {rise[n] / total:.1%} |"
              for n in top]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
