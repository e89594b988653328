"""The W4A4 tables across the bundled families, from the results files of the runs.

Reads ``benchmarks/results/w4a4_<model>.json`` (written by ``benchmarks/ablation.py --num 500
--paired-seeds --out benchmarks/results/w4a4_<model>``: each calibration seed's model scored on
that seed's paired samples, as ``accuquant compare --seed N`` scores them) and, as the
reference, per-step at W4A8 from ``compare_<model>_seed<N>.json`` (the same paired samples;
for mnist-ddpm, whose compare files hold 300 samples, a ``per-step`` row at w4a8 in its own
``w4a4_mnist-ddpm.json``), and writes ``benchmarks/results/w4a4.{md,json}``:

* per family and seed, AccuQuant W4A4 with outlier handling against the SVDQuant-like
  baseline at the same options (per-step calibration, no trajectory) and per-step W4A8;
* the other rows of each file (other widths, ranks, mixed precision), mean over their seeds;
* the memory of one AccuQuant step at M = 1, 4, 8 with the W4A4 options against W4A8, from
  ``memory_w4a4_<model>.json`` / ``memory_w4a8_<model>.json`` (``benchmarks/memory.py``) and at
  SD-1.5 size from ``memory_sd_w4a4_r32.json`` (``benchmarks/memory_sd.py``).

    python benchmarks/w4a4_table.py
"""

from __future__ import annotations

import json
import statistics

from ablation import VERSION_MARKS, version_note
from common import ROOT

from accuquant import bundled
from accuquant.methods import METHODS

RESULTS = ROOT / "benchmarks" / "results"
AQ, SVDQ = "accuquant r=32", "svdquant-like r=32"
WIDTHS = ("Widths: every quantized weight at 4 bits, one range per group of 64 inputs of each output channel "
          "(a layer whose inputs per channel, times its kernel, are not a multiple of 64: one per channel); every "
          "quantized layer input at 4 bits, per token and dynamic (a conv input's pixel is a token), times a "
          "learned clipping factor; the attention matmul inputs (Q, K, V) and the softmax output at 8 bits, one "
          "static range each; the low-rank branch (rank 32 unless the row says) in float32 on the smoothed, "
          "unquantized input; the layers each family keeps in full precision (`accuquant quantize --help`) in "
          "float32. Outlier handling: smoothing (SmoothQuant's start, alpha 0.5) and the low-rank branch, no "
          "rotation. Rows named w4a6 or w3a4 change only the two widths of the first two sentences; a family "
          "named '... conv' (and rows named 'conv') ran with `--conv-outliers`: 1x1 convolutions take the branch "
          "too, and the shortcut-split convolutions of the U-Nets smoothing and the branch, which they lack by "
          "default.")


def _reference(model: str, seed: int, rows: dict) -> dict | None:
    """Per-step W4A8 on ``seed``'s paired samples: FID to FP, PSNR, SSIM, and where it comes from."""
    if ("w4a8", "per-step") in rows:
        run = next((r for r in rows["w4a8", "per-step"]["runs"] if r["seed"] == seed), None)
        if run:
            return {"fid2fp": run["fid2fp"], "psnr": run["psnr"], "ssim": run["ssim"],
                    "fid2fp_interval": run.get("fid2fp_interval"), "from": f"w4a4_{model}.json"}
    path = RESULTS / f"compare_{model}_seed{seed}.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    if doc["settings"]["num"] != 500:
        return None
    run = next((r for r in doc["runs"] if r["method"] == "per-step" and r["bits"] == "w4a8"), None)
    return run and {**{k: run["metrics"].get(k) for k in ("fid2fp", "psnr", "ssim", "fid2fp_interval")},
                    "from": path.name}


def main() -> None:
    out_rows, other_rows, cpus = [], [], set()
    for model in bundled.MODELS:
        path = RESULTS / f"w4a4_{model}.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        cpus.add(doc.get("cpu") or "not recorded")
        rows = {(r["bits"], r["label"]): r for r in doc["rows"]}
        for conv in ("", " conv"):  # as the row's options are: by default, and with --conv-outliers
            aq, sv = rows.get(("w4a4", AQ + conv)), rows.get(("w4a4", SVDQ + conv))
            if not (aq and sv):
                continue
            by_seed = {r["seed"]: r for r in sv["runs"]}
            for a in aq["runs"]:
                s = by_seed.get(a["seed"])
                if s is None:
                    continue
                ref = _reference(model, a["seed"], rows)
                row = {"model": model, "conv_outliers": bool(conv), "seed": a["seed"], "accuquant": a,
                       "svdquant_like": s, "per_step_w4a8": ref, "ratio_to_svdquant_like": a["fid2fp"] / s["fid2fp"]}
                row["targets"] = {
                    "fid_at_most_per_step_w4a8": ref is not None and a["fid2fp"] <= ref["fid2fp"],
                    "psnr_within_1db_of_per_step_w4a8": ref is not None and a["psnr"] >= ref["psnr"] - 1,
                    "half_of_svdquant_like_with_higher_psnr_ssim": (row["ratio_to_svdquant_like"] <= 0.5
                                                                    and a["psnr"] > s["psnr"]
                                                                    and a["ssim"] > s["ssim"])}
                out_rows.append(row)
        for (bits, label), r in rows.items():
            if (bits, label) in (("w4a4", AQ), ("w4a4", SVDQ), ("w4a4", AQ + " conv"), ("w4a4", SVDQ + " conv"),
                                 ("w4a8", "per-step")):
                continue
            other_rows.append({"model": model, "bits": bits, "label": label, "options": r["options"],
                               "method": r["method"], "method_version": r.get("method_version", 1),
                               "seeds": [x["seed"] for x in r["runs"]], "runs": r["runs"],
                               **{c: statistics.fmean(x[c] for x in r["runs"]) for c in ("fid2fp", "psnr", "ssim")},
                               # the initialisation alone (iters=0): its own time, as ablation.py gives it
                               "method_s": statistics.median(x["init_s"] for x in r["runs"])
                               if r["options"].get("iters") == 0 else r["method_s"]})
    out_rows.sort(key=lambda r: (bundled.MODELS.index(r["model"]), r["conv_outliers"], r["seed"]))
    memory, mixed = _memory(), _mixed_against_uniform(out_rows, other_rows)
    (RESULTS / "w4a4.json").write_text(json.dumps({"cpu": sorted(cpus), "main": out_rows, "other": other_rows,
                                                   "mixed_against_uniform": mixed, "memory": memory}, indent=2))
    f = lambda x: f"{x:.3f}"  # noqa: E731

    def fid(run: dict) -> str:  # with its 95% bootstrap interval where the run recorded one
        ci = run.get("fid2fp_interval")
        return f(run["fid2fp"]) + (f" ({ci[0]:.2f}..{ci[1]:.2f})" if ci else "")

    lines = [f"W4A4 on the bundled families: 500 paired samples per run, 20 steps of each model's default sampler, "
             f"64 calibration trajectories; each calibration seed scored on its own paired samples. CPU: "
             f"{'; '.join(sorted(cpus))}. Written by benchmarks/w4a4_table.py from w4a4_<model>.json "
             "(benchmarks/ablation.py) and, for per-step W4A8, compare_<model>_seed<N>.json.", "", WIDTHS, "",
             "| family | seed | per-step W4A8: FID / PSNR | SVDQuant-like W4A4: FID / PSNR / SSIM | "
             "AccuQuant W4A4: FID / PSNR / SSIM | AccuQuant / SVDQuant-like | FID <= per-step W4A8 | "
             "PSNR within 1 dB | <= 0.5x, PSNR and SSIM higher |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    for r in out_rows:
        a, s, ref, t = r["accuquant"], r["svdquant_like"], r["per_step_w4a8"], r["targets"]
        lines.append(f"| {r['model']}{' conv' if r['conv_outliers'] else ''} | {r['seed']} | "
                     + (f"{fid(ref)} / {ref['psnr']:.2f}" if ref else "not measured") + " | "
                     f"{fid(s)} / {s['psnr']:.2f} / {s['ssim']:.4f} | "
                     f"{fid(a)} / {a['psnr']:.2f} / {a['ssim']:.4f} | {r['ratio_to_svdquant_like']:.2f}x | "
                     f"{yes(t['fid_at_most_per_step_w4a8'])} | {yes(t['psnr_within_1db_of_per_step_w4a8'])} | "
                     f"{yes(t['half_of_svdquant_like_with_higher_psnr_ssim'])} |")
    if other_rows:
        lines += ["", "Other rows (mean over the seeds given; 'svdquant-like' rows are per-step with the same options "
                  "and no trajectory, 'accuquant' rows start from them; r=R: rank of the branch, r=0: smoothing "
                  "alone; 'mixed 4.25': weights at 8, 6 or 4 bits by accumulated error, 4.25 bits on average over "
                  "the quantized parameters, before the per-step start; 'conv': `--conv-outliers`, the branch "
                  "also on 1x1 convolutions and smoothing and the branch on shortcut-split ones, which have neither "
                  "by default; 'learn branch', 'learn all', 'outlier_lr': AccuQuant also learns the branch factors, "
                  "or every outlier transform (smoothing scales too), or every one at that rate):", "",
                  "| family | bits | variant | seeds | FID to FP | PSNR | SSIM | "
                  "method s (svdquant-like: the per-step start's) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        old = []
        for r in sorted(other_rows, key=lambda r: (bundled.MODELS.index(r["model"]), r["bits"], r["label"])):
            label = r["label"]
            if r["method_version"] < METHODS[r["method"]].Config.VERSION:
                label += " " + VERSION_MARKS[r["method_version"]]
                old.append(r["method_version"])
            cell = fid(r["runs"][0]) if len(r["runs"]) == 1 else f(r["fid2fp"])  # a mean: no interval
            lines.append(f"| {r['model']} | {r['bits']} | {label} | {','.join(map(str, r['seeds']))} | {cell} | "
                         f"{r['psnr']:.2f} | {r['ssim']:.4f} | {r['method_s']:.0f} |")
        if old:
            lines += ["", version_note(old)]
    if mixed:
        lines += ["", "Mixed precision (weights at 8, 6 or 4 bits by accumulated error, 4.25 bits on average; "
                  "activations at 4) against uniform W4A4, AccuQuant r=32 both, on the same calibration seed:", "",
                  "| family | seed | uniform W4A4: FID / PSNR | mixed 4.25: FID / PSNR | mixed / uniform FID | "
                  "FID lower | PSNR higher |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for m in mixed:
            u, x = m["uniform"], m["mixed"]
            family = m["model"] + (" conv" if m["conv_outliers"] else "")
            lines.append(f"| {family} | {m['seed']} | {fid(u)} / {u['psnr']:.2f} | "
                         f"{fid(x)} / {x['psnr']:.2f} | {x['fid2fp'] / u['fid2fp']:.2f}x | "
                         f"{yes(x['fid2fp'] < u['fid2fp'])} | {yes(x['psnr'] > u['psnr'])} |")
    if memory:
        lines += ["", "Memory of one AccuQuant optimisation step (checkpoint gradient) over M simulated steps: peak "
                  "resident memory during the step minus before it, and its ratio to M = 1; bundled models: 8 "
                  "trajectories (16 rows with guidance), medians of 3 fresh processes (benchmarks/memory.py); "
                  "SD-1.5 size: the 860 M-parameter UNet configuration with random weights, one trajectory, fixed "
                  "weight codes as AccuQuant's default keeps them (benchmarks/memory_sd.py). W4A8 is per tensor "
                  "with no outlier handling, W4A4 the options above with rank-32 branches.", "",
                  "| model | options | M=1 | M=4 | M=8 | M=8 / M=4 |", "| --- | --- | --- | --- | --- | --- |"]
        for m in memory:
            cells = [f"{m['mb'][k]:.0f} MB ({m['mb'][k] / m['mb']['1']:.2f}x)" if k in m["mb"] else "n/a"
                     for k in ("1", "4", "8")]
            tail = f"{m['mb']['8'] / m['mb']['4']:.2f}x" if {"4", "8"} <= set(m["mb"]) else "n/a"
            lines.append(f"| {m['model']} | {m['options']} | " + " | ".join(cells) + f" | {tail} |")
    (RESULTS / "w4a4.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _mixed_against_uniform(main: list[dict], other: list[dict]) -> list[dict]:
    """Each seed of each current-version 'accuquant r=32 mixed 4.25' row (and '... conv mixed
    4.25' row) beside uniform AccuQuant with the same options on it."""
    uniform = {(r["model"], r["conv_outliers"], r["seed"]): r["accuquant"] for r in main}
    out = []
    for r in other:
        current = r["method_version"] >= METHODS[r["method"]].Config.VERSION
        conv = r["label"] == AQ + " conv mixed 4.25"
        if r["bits"] != "w4a4" or r["label"] not in (AQ + " mixed 4.25", AQ + " conv mixed 4.25") or not current:
            continue
        for run in r["runs"]:
            if (r["model"], conv, run["seed"]) in uniform:
                out.append({"model": r["model"], "conv_outliers": conv, "seed": run["seed"], "mixed": run,
                            "uniform": uniform[r["model"], conv, run["seed"]]})
    return sorted(out, key=lambda m: (bundled.MODELS.index(m["model"]), m["conv_outliers"], m["seed"]))


def _memory() -> list[dict]:
    """Step memory (MB above the start, by M) per model and options, from the memory results files."""
    out = []
    for model in bundled.MODELS:
        for options in ("w4a8", "w4a4"):
            path = RESULTS / f"memory_{options}_{model}.json"
            if path.exists():
                rows = json.loads(path.read_text())["rows"]
                out.append({"model": model, "options": options.upper(), "source": path.name,
                            "mb": {str(r["m"]): r["step_mb"] for r in rows if r["mode"] == "checkpoint"}})
    path = RESULTS / "memory_sd_w4a4_r32.json"
    if path.exists():
        rows = [r for r in json.loads(path.read_text())["rows"] if r["kind"] == "step-codes"]
        if rows:
            out.append({"model": "SD-1.5 size", "options": "W4A4", "source": path.name,
                        "mb": {r["value"]: r["peak_mb"] for r in rows}})
    return out


if __name__ == "__main__":
    main()
