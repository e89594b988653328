"""AccuQuant ablations on a bundled model: group size, gradient mode, initialisation.

Every variant is calibrated with several calibration seeds (the calibration trajectories
and every random draw of the method change with the seed) and scored on the same paired
samples against FP (20 steps of the model's default sampler: flow-euler for mnist-sd3,
else DDIM); the table gives the mean and the spread (min..max)
over seeds, the calibration time of the variant's own optimisation, and its compute in
denoiser evaluations (forward + backward passes of one sample through the denoiser,
both branches of the guided step counted).

    python benchmarks/ablation.py --bits w4a8 --num 300 --seeds 0,1,2 \\
        --variants "per-step;M=1:group_size=1;M=4:group_size=4;approx:group_size=4,grad=approx"
    # writes benchmarks/results/ablation.json and ablation.md (rows of other runs are kept)
    python benchmarks/ablation.py --model mnist-dit ...   # ablation_mnist-dit.json and .md

A variant is ``label:key=value,key=value`` (accuquant options, and ``keep_fp=a|b``: the modules
left in full precision, fnmatch patterns joined by ``|``, empty for none, instead of the
family's defaults); ``naive`` and ``per-step`` are the baselines (AccuQuant with no optimisation step, i.e. its initialisation alone). The per-step initialisation is computed once per (bits, seed) and
shared through the result cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import accuquant as aq
from accuquant import bundled
from accuquant.eval.evaluation import evaluate, to_json_safe
from accuquant.methods import METHODS
from accuquant.io.files import atomic_path
from accuquant.config import parse_bits_label

from common import ROOT, cpu_name, parse_options, settings  # noqa: E402  (benchmarks/ is on the path when run)
COLS = ("fid2fp", "psnr", "ssim", "class_accuracy")
#: the mark on rows measured with an older version of the method, and what it means (also quoted by
#: readme_results.py)
VERSION_MARKS = {1: "‡", 2: "†", 3: "§"}
VERSION_NOTES = {
    1: "‡: measured with version 1 of the method, whose result for these options is the same as version 2's "
       "(version 2 keeps a learned rounding as fixed integer codes while the step sizes move; these rows start "
       "from naive ranges, learn the rounding, or make no optimisation step).",
    2: "†: measured with version 2 of the method; version 3 runs the same optimisation in the shared engine "
       "(its Adam, one random stream per run): the same objective and parameters, other random draws.",
    3: "§: measured with version 3 of the method, which learned the outlier transforms (smoothing scales and "
       "low-rank factors) beside the step sizes; version 4 keeps them as the initialisation left them unless "
       "told (learn_outliers). Without outlier transforms both versions give the same result.",
}


def version_note(versions) -> str:
    """The notes of the marks that ``versions`` (method versions of the rows shown) carry."""
    return " ".join(VERSION_NOTES[v] for v in sorted(set(versions)) if v in VERSION_NOTES)


def parse_variant(text: str) -> tuple[str, str, dict]:
    label, _, rest = text.partition(":")
    if label in ("naive", "per-step") and not rest:
        # the initialisations alone: AccuQuant with no optimisation step is exactly its init
        return label, "accuquant", {"init": label, "iters": 0}
    return label, "accuquant", parse_options(rest)


def quant_config(bits: str, opts: dict) -> tuple[aq.QuantConfig, dict]:
    """The quantization config of a variant at ``bits`` ("w4a8"), and its method options: an
    option that names a ``QuantConfig`` field goes to the config (lists '|'-separated:
    ``keep_fp=a|b``, ``outliers=smooth|rotate``)."""
    w, a = parse_bits_label(bits)
    opts = dict(opts)
    fields = {f.name for f in dataclasses.fields(aq.QuantConfig)}
    quant = {k: opts.pop(k) for k in list(opts) if k in fields}
    for k in ("keep_fp", "outliers"):
        if k in quant:
            quant[k] = tuple(p for p in str(quant[k]).split("|") if p)
    return aq.QuantConfig(weight_bits=w, act_bits=a, **quant), opts


def denoiser_evals(q: aq.Pipeline) -> int:
    log = q.quant.method_log
    ev = log.get("evaluations", {})
    return int(ev.get("forward", 0) + ev.get("backward", 0))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=bundled.MODELS[0], choices=bundled.MODELS)
    p.add_argument("--bits", default="w4a8")
    p.add_argument("--variants", default="", help="';'-separated label:key=value,... (see the docstring)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--num", type=int, default=300)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--paired-seeds", action="store_true", help="score each calibration seed's model on the paired "
                   "samples of that seed, as `accuquant compare --seed N` does (default: sample seed 0 for all)")
    p.add_argument("--out", default=None, help="results path without extension (default: "
                   "benchmarks/results/ablation, with _MODEL for a model other than the default)")
    p.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json, run nothing")
    p.add_argument("--drop", default="", help="';'-separated bits/label rows to delete from the results, "
                   "e.g. 'w4a8/M=2 lr 3e-4' (superseded rows); nothing is run")
    args = p.parse_args()
    if args.out is None:
        suffix = "" if args.model == bundled.MODELS[0] else f"_{args.model}"
        args.out = str(ROOT / f"benchmarks/results/ablation{suffix}")
    if args.render_only or args.drop:
        write({}, args, drop={tuple(x.split("/", 1)) for x in args.drop.split(";") if x})
        return
    fp = aq.load(args.model)
    rows = {}  # this run's rows; write() merges them with the file's
    for bits in args.bits.split(","):
        for text in args.variants.split(";"):
            label, method, opts = parse_variant(text)
            cfg, method_opts = quant_config(bits, opts)
            runs = []
            for seed in (int(s) for s in args.seeds.split(",")):
                t0 = time.perf_counter()
                q = aq.quantize(fp, cfg, method, steps=args.steps, calib_samples=args.calib_samples, seed=seed,
                                progress=False, **method_opts)
                wall = time.perf_counter() - t0
                log = q.quant.method_log
                r = evaluate(q, base=fp, num=args.num, steps=args.steps, progress=False,
                             seed=seed if args.paired_seeds else 0)
                runs.append({"seed": seed, **{c: r[c] for c in COLS}, "fid2fp_interval": r.get("fid2fp_interval"),
                             "wall_s": round(wall, 1),
                             "method_s": log.get("seconds", q.quant.timing_s["method"]),
                             "init_s": log.get("init", {}).get("seconds"),
                             "evals": denoiser_evals(q), "final_loss": (log.get("loss_curve") or [None])[-1]})
                print(json.dumps({"bits": bits, "label": label, **runs[-1]}), flush=True)
            rows[bits, label] = _summarised({"bits": bits, "label": label, "method": method, "options": opts,
                                             "num": args.num, "method_version": METHODS[method].Config.VERSION,
                                             "runs": runs})
            write(rows, args)


def _summarised(row: dict) -> dict:
    """``row`` with its summary over its runs (mean, min, max) and median time and compute."""
    runs = row["runs"]
    summary = {c: {"mean": statistics.fmean(x[c] for x in runs), "min": min(x[c] for x in runs),
                   "max": max(x[c] for x in runs)} for c in COLS}
    return {**row, "summary": summary, "method_s": statistics.median(x["method_s"] for x in runs),
            "evals": statistics.median(x["evals"] for x in runs)}


def write(rows: dict, args, drop: set = frozenset()) -> None:
    """Merge ``rows`` into the results file (under a lock: several ablations may run at once),
    without the ``(bits, label)`` rows in ``drop``, and rewrite the table. With neither (a
    re-render) the results file is left as it is; with only ``drop`` it keeps its settings."""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = Path(args.out + ".json")
        doc = json.loads(old.read_text()) if old.exists() else {"rows": []}
        merged = {(r["bits"], r["label"]): r for r in doc["rows"] if r.get("num") == args.num}
        missing = drop - set(merged)
        if missing:
            print(f"ablation.py: --drop: no such row(s): {sorted(missing)}", file=sys.stderr)
            raise SystemExit(2)
        for k in drop:
            del merged[k]
        for k, r in rows.items():  # a rerun of a row with the same options adds its seeds (or replaces them)
            r = to_json_safe(r)
            old_row = merged.get(k)
            if old_row and old_row["options"] == r["options"] and old_row.get("method_version") == r["method_version"]:
                seeds = {x["seed"] for x in r["runs"]}
                r = _summarised({**r, "runs": sorted([x for x in old_row["runs"] if x["seed"] not in seeds]
                                                     + r["runs"], key=lambda x: x["seed"])})
            merged[k] = r
        out = sorted(merged.values(), key=lambda r: (r["bits"], r["label"]))
        if rows or drop:
            with atomic_path(old) as tmp:
                tmp.write_text(json.dumps({"rows": out, "settings": settings(args) if rows else doc["settings"],
                                           "cpu": cpu_name() if rows else doc.get("cpu"),
                                           "torch": torch.__version__ if rows else doc["torch"]}, indent=2))
        _write_md(out, args)


def _is_default(row: dict) -> bool:
    """A variant that runs AccuQuant exactly as its defaults do (the options it names)."""
    from accuquant.methods.accuquant import AccuQuantConfig

    opts, DEFAULTS = row["options"], dataclasses.asdict(AccuQuantConfig())
    quant = {f.name for f in dataclasses.fields(aq.QuantConfig)}
    return (row["method"] == "accuquant" and not quant & set(opts)
            and all(opts.get(k, v) == v for k, v in DEFAULTS.items()))


def _write_md(out: list, args) -> None:
    old = []  # versions of the rows marked as measured with an older method
    lines = ["| bits | variant | " + " | ".join(COLS) + " | method s (median) | denoiser evals | seeds |",
             "|" + " --- |" * (len(COLS) + 5)]
    for r in out:
        cells = [f"{r['summary'][c]['mean']:.3f} ({r['summary'][c]['min']:.3f}..{r['summary'][c]['max']:.3f})"
                 for c in COLS]
        if r["options"].get("iters") == 0:  # the initialisation alone: its own time, compute not counted
            secs, evals = statistics.median(x["init_s"] for x in r["runs"]), "n/a"
        else:
            secs, evals = r["method_s"], f"{r['evals']:.3g}"
        label = r["label"] + (" (default)" if _is_default(r) else "")
        version = r.get("method_version", 1)
        if version < METHODS[r["method"]].Config.VERSION:
            label += " " + VERSION_MARKS[version]
            old.append(version)
        lines.append(f"| {r['bits']} | {label} | " + " | ".join(cells)
                     + f" | {secs:.0f} | {evals} | {len(r['runs'])} |")
    Path(args.out + ".md").write_text(
        f"AccuQuant variants on {args.model}; {args.num} paired samples per run, "
        f"{'flow-euler' if args.model in ('mnist-sd3', 'mnist-flux') else 'DDIM'} {args.steps} steps, "
        f"calibration on {args.calib_samples} trajectories; mean (min..max) over calibration seeds; written by "
        "benchmarks/ablation.py. Options of each variant are in ablation.json. 'method s' is the time of the "
        "variant's own optimisation (AccuQuant rows exclude the shared per-step initialisation, which runs once "
        "per (bits, seed); the per-step row gives that initialisation's time); 'denoiser evals' counts forward "
        "and backward passes of one sample through the denoiser, both guidance branches counted. Times are "
        "single-thread processes on a shared 2-core machine"
        + (f" ({json.loads(Path(args.out + '.json').read_text()).get('cpu') or 'CPU not recorded'})."
           if Path(args.out + ".json").exists() else ".")
        + (" " + version_note(old) if old else "")
        + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
