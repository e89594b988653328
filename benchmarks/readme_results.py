"""Regenerate the README's results section (and benchmarks/results/compare*.{md,json},
docs/compare/*.png) from `accuquant compare` output and the other benchmarks' results files.

    accuquant compare --num 300 --analyze-num 200 --out runs/compare
    accuquant compare --bits w4a8,w3a8 --num 300 --analyze-num 200 --seed 1 --out runs/compare-seed1
    accuquant compare --bits w4a8,w3a8 --num 300 --analyze-num 200 --seed 2 --out runs/compare-seed2
    python benchmarks/readme_results.py --compare runs/compare --seeds runs/compare-seed1,runs/compare-seed2

With no arguments it re-renders the README from the results files already in the
repository (benchmarks/results/compare.json, compare_seeds.json, quality.md, ablation.md,
memory.md). Everything between the README's ``results:begin`` and ``results:end``
markers is written here, so the README cannot drift from what was measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from ablation import version_note
from w4a4_table import WIDTHS as W4A4_WIDTHS
from common import ROOT  # noqa: E402  (benchmarks/ is on the path when run)

from accuquant.eval.report import NOTES, markdown_table

RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "compare"
README = ROOT / "README.md"
BEGIN = "<!-- results:begin (written by benchmarks/readme_results.py: do not edit by hand) -->"
END = "<!-- results:end -->"
MODELS_BEGIN = "<!-- models:begin (written by benchmarks/readme_results.py from `accuquant models`: do not edit by hand) -->"
MODELS_END = "<!-- models:end -->"


def models_table() -> str:
    """The supported families, as ``accuquant models`` prints them."""
    from accuquant.cli.models import table

    return table()
SEED_COLS = ("fid2fp", "psnr", "ssim", "class_accuracy")


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def import_compare(main_dir: Path, seed_dirs: list[Path]) -> None:
    """Copy a comparison's results and figures into the repository."""
    res = _load(main_dir / "results.json")
    RESULTS.mkdir(parents=True, exist_ok=True)
    DOCS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compare.json").write_text(json.dumps(res, indent=2))
    shutil.copyfile(main_dir / "report.md", RESULTS / "compare.md")
    for bits in res["settings"]["bits"]:
        for kind in ("grid", "errors"):
            shutil.copyfile(main_dir / f"{kind}-{bits}.png", DOCS / f"{kind}-{bits}.png")
    seeds = [res] + [_load(d / "results.json") for d in seed_dirs]
    keep = [{"settings": s["settings"], "wall_s": s["wall_s"],
             "runs": [{"method": r["method"], "bits": r["bits"], "metrics": {c: r["metrics"][c] for c in SEED_COLS},
                       "calibration_s": r["cost"]["calibration_s"]} for r in s["runs"]]} for s in seeds]
    (RESULTS / "compare_seeds.json").write_text(json.dumps(keep, indent=2))


def _table_lines(md: Path) -> list[str]:
    """A results file from its first table on (its opening paragraph is the README's own text):
    every table, and the lines between and after them (notes), blank lines kept."""
    lines = md.read_text().splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    out = lines[first:]
    while out and not out[-1].strip():
        out.pop()
    return out


def _ratio_lines(res: dict) -> list[str]:
    out = []
    runs = {(r["method"], r["bits"]): r["metrics"] for r in res["runs"]}
    for bits in res["settings"]["bits"]:
        a, p = runs.get(("accuquant", bits)), runs.get(("per-step", bits))
        if not (a and p and p["fid2fp"]):
            continue
        out.append(f"- {bits.upper()}: AccuQuant's FID to FP is {a['fid2fp'] / p['fid2fp']:.2f}x per-step's "
                   f"({a['fid2fp']:.2f} against {p['fid2fp']:.2f}); PSNR {a['psnr']:.2f} against {p['psnr']:.2f} dB, "
                   f"SSIM {a['ssim']:.3f} against {p['ssim']:.3f}.")
    return out


def _spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ({min(values):.3f}..{max(values):.3f})"


def seed_section(seeds: list[dict]) -> list[str]:
    bits_all = [b for b in seeds[0]["settings"]["bits"] if all(b in s["settings"]["bits"] for s in seeds)]
    methods = seeds[0]["settings"]["methods"]
    lines = ["| bits | method | " + " | ".join(SEED_COLS) + " | FID to FP / per-step's, each seed |",
             "|" + " --- |" * (len(SEED_COLS) + 3)]
    for bits in bits_all:
        per = [{r["method"]: r["metrics"] for r in s["runs"] if r["bits"] == bits} for s in seeds]
        for m in methods:
            if not all(m in p for p in per):
                continue
            cells = [_spread([p[m][c] for p in per]) for c in SEED_COLS]
            ratio = ", ".join(f"{p[m]['fid2fp'] / p['per-step']['fid2fp']:.2f}" for p in per) \
                if "per-step" in per[0] and m != "per-step" else ""
            lines.append(f"| {bits} | {m} | " + " | ".join(cells) + f" | {ratio} |")
    return lines


#: tables included from the other benchmarks' results files: (file, heading, how it was made)
OTHER_TABLES = [
    ("quality.md", "1,000 paired samples (seed 0)",
     "`python benchmarks/quality.py --methods naive,per-step,accuquant --bits w8a8,w4a8,w3a8,w4a6` "
     "(`benchmarks/results/quality.md`): the same pairs scored on 1,000 paired samples, calibration seed 0. "
     "AccuQuant's calibration time excludes the per-step initialisation it starts from (cached)."),
    ("ablation.md", "AccuQuant ablations (three calibration seeds)",
     "`python benchmarks/ablation.py --bits w4a8 --num 200 --seeds 0,1,2 --variants ...` (and `--bits w3a8`; "
     "`benchmarks/results/ablation.md`, options of each variant in `ablation.json`): mean (min..max) over "
     "calibration seeds 0, 1, 2 on 200 paired samples. Unless a label says otherwise, variants get the same "
     "compute (iterations x M = 400) and start from the same per-step result of their seed. " + version_note([1, 2])),
    ("compare_mnist-dit.md", "mnist-dit (latent DiT): all methods",
     "`python benchmarks/families.py --model mnist-dit --bits w4a8,w3a8 --seeds 0,1,2 --num 500`, and W8A8 for seed 0 "
     "(`--bits w8a8,w4a8,w3a8 --seeds 0`; one `accuquant compare` per calibration seed; "
     "`benchmarks/results/compare_mnist-dit*.{md,json}`, grids in `docs/compare/mnist-dit/`): each seed, then the "
     "mean (min..max) over seeds. AccuQuant's calibration time excludes the per-step initialisation it starts from "
     "(cached from the per-step pair)."),
    ("neighbours_mnist-dit.md", "mnist-dit: AccuQuant and its neighbours (PTQD, TAC, QNCD, TFMQ-DM, EDA-DM)",
     "`python benchmarks/families.py --name neighbours --model mnist-dit --bits w4a8,w3a8 --seeds 0,1,2 --num 500 "
     "--methods naive,per-step,ptqd,tac,qncd,tfmq,eda-dm,accuquant,accuquant+ptqd,accuquant+tac,accuquant+qncd` "
     "(one `accuquant compare` per calibration seed; `benchmarks/results/neighbours_mnist-dit*.{md,json}`, with "
     "the CPU's name; what each method is: docs/methods.md): each seed, FID to FP with its bootstrap interval, "
     "PSNR and the accumulated error at the last step, then the mean (min..max) over the seeds a method has "
     "and its FID as a ratio of per-step's. `ptqd`, `tac` and `qncd` are per-step with that correction; "
     "`accuquant+X` is AccuQuant's calibration with it. What the table says: AccuQuant has the lowest FID to FP "
     "and the highest PSNR of the calibration methods at both widths. At W4A8 every neighbour improves on per-step, "
     "as their papers report; at W3A8 on this DiT only qncd matches per-step and the others fall behind it "
     "(TFMQ-DM, whose paper works on UNets, among them). Of the corrections on top of AccuQuant, ptqd and qncd "
     "change little at W4A8, ptqd lowers the W3A8 FID on every seed (within the bootstrap intervals), and tac "
     "raises it at both. The calibration times were taken with two such runs at once on the 2 cores: they "
     "compare methods within the table, not machines."),
    ("ablation_mnist-dit.md", "mnist-dit: group size at equal compute, and what stays in full precision",
     "`python benchmarks/ablation.py --model mnist-dit --bits w4a8 --num 300 --seeds 0,1,2 --variants ...` "
     "(`benchmarks/results/ablation_mnist-dit.{md,json}`): AccuQuant with M = 1, 2, 4, 8 and the whole 20-step "
     "trajectory at the same compute (iterations x M = 400; M = 8 cuts the trajectory into 8 + 8 + 4, so slightly "
     "fewer evaluations), each from the per-step result of its seed; and per-step with every layer quantized, or "
     "with the timestep and adaLN MLPs of every block (or only one of the two) also kept in full precision, "
     "against the default (patch embedding and output projections in full precision), and AccuQuant (M = 4) with "
     "both MLPs in full precision."),
    ("compare_mnist-sd.md", "mnist-sd (latent text-to-image): all methods",
     "`python benchmarks/families.py --model mnist-sd --bits w8a8,w4a8,w3a8 --seeds 0 --num 500`, then "
     "`--bits w4a8,w3a8 --seeds 1,2` (`benchmarks/results/compare_mnist-sd*.{md,json}`, grids in "
     "`docs/compare/mnist-sd/`): each seed, then the mean (min..max) over seeds."),
    ("ablation_mnist-sd.md", "mnist-sd: group size at equal compute",
     "`python benchmarks/ablation.py --model mnist-sd --bits w4a8 --num 300 --seeds 0,1,2 --variants ...` "
     "(`benchmarks/results/ablation_mnist-sd.{md,json}`): the same group-size ablation on the text-to-image UNet."),
    ("neighbours_mnist-sd3.md", "mnist-sd3: AccuQuant and its neighbours",
     "The same comparison as mnist-dit's (`--model mnist-sd3`; `benchmarks/results/neighbours_mnist-sd3*`), on the "
     "calibration seeds the file lists; two such runs at once on the 2 cores."),
    ("neighbours_mnist-flux.md", "mnist-flux: AccuQuant and its neighbours",
     "The same comparison as mnist-dit's (`--model mnist-flux`; `benchmarks/results/neighbours_mnist-flux*`), on "
     "the calibration seeds the file lists; two such runs at once on the 2 cores."),
    ("compare_mnist-sd3.md", "mnist-sd3 (flow-matching MMDiT, text-to-image): all methods",
     "`python benchmarks/families.py --model mnist-sd3 --bits w8a8,w4a8,w3a8 --seeds 0 --num 500`, then "
     "`--bits w4a8,w3a8 --seeds 1,2` (`benchmarks/results/compare_mnist-sd3*.{md,json}`, grids and error plots in "
     "`docs/compare/mnist-sd3/`): flow-matching Euler, 20 steps, guidance 2.0; each seed, then the mean "
     "(min..max) over seeds."),
    ("compare_mnist-flux.md", "mnist-flux (FLUX.1: double- and single-stream blocks, rotary embeddings): all methods",
     "`python benchmarks/families.py --model mnist-flux --bits w4a8,w3a8 --seeds 0,1,2 --num 500` (one `accuquant "
     "compare` per calibration seed; `benchmarks/results/compare_mnist-flux*.{md,json}`, grids and error plots in "
     "`docs/compare/mnist-flux/`): flow-matching Euler with FLUX's sigmas and dynamic shift, 20 steps, true "
     "guidance 2.0; each seed, then the mean (min..max) over seeds."),
    ("ablation_mnist-flux.md", "mnist-flux: group size, and what was tried at W3A8",
     "`python benchmarks/ablation.py --model mnist-flux --bits w4a8 --num 300 --seeds 0 --variants "
     "\"M=1:group_size=1,iters=400;M=4:group_size=4,iters=100\"`, then at W3A8 (`--bits w3a8`) the per-step start, "
     "the default, 300 and 600 optimisation steps, M = 8, a 3x learning rate, the rounding learned jointly "
     "(`rounding=learn`), the adaLN modulation linears kept in FP (`modulation FP`: every block's `norm1.linear`, "
     "`norm1_context.linear` and the single blocks' `norm.linear`), and the timestep, guidance and pooled-text "
     "embedders and the context embedder kept in FP (`embedders FP`: `time_text_embed.*`, `context_embedder`) for "
     "per-step and AccuQuant; calibration seed 0, 300 paired samples "
     "(`benchmarks/results/ablation_mnist-flux.{md,json}`). No variant brings W3A8 to half of per-step's FID to FP: "
     "the closest are 300 steps (0.70x of the per-step row) and the embedders in FP (0.66x of per-step with the "
     "same layers in FP), against the default's 0.88x; learning the rounding jointly doubles the error, a 3x rate "
     "raises it, and 600 steps and M = 8 change little. What AccuQuant does gain at W3A8 is the accumulated error "
     "(0.62 against per-step's 0.72 at the last step, seed 0 of the compare runs) and 1.1 to 1.4 dB of PSNR on "
     "every seed; per-step on this model is already close (FID to FP 1.18 at W3A8, where mnist-sd3's per-step "
     "scores 2.37), so there is less for the trajectory to win back."),
    ("ablation_mnist-sd3.md", "mnist-sd3: group size at equal compute, and a longer optimisation",
     "`python benchmarks/ablation.py --model mnist-sd3 --bits w4a8 --num 300 --seeds 0,1,2 --variants ...` "
     "(`benchmarks/results/ablation_mnist-sd3.{md,json}`): the group-size ablation on a flow trajectory, and "
     "AccuQuant with 300 optimisation steps instead of 100 (`iters=300`) at W4A8 and W3A8. The longer run "
     "brings W3A8 to 0.49x, 0.41x and 0.45x of per-step's FID to FP on the three seeds (the default's 0.60x, "
     "0.45x, 0.56x), but not W4A8 (0.65x, 0.30x, 0.47x; the default's 0.55x, 0.32x, 0.50x), at three times the "
     "time, so the default stays at 100 steps."),
    ("ablation_mnist-sd3_keepfp.md", "mnist-sd3: what stays in full precision",
     "`python benchmarks/ablation.py --model mnist-sd3 --bits w4a8 --num 300 --seeds 0 --out "
     "results/ablation_mnist-sd3_keepfp --variants ...` (`benchmarks/results/ablation_mnist-sd3_keepfp.{md,json}`): "
     "per-step with the default list (patch embedding, final norm and projection in full precision), with every "
     "layer quantized, and with the timestep and pooled-text embedders and the context embedder "
     "(`time_text_embed.*`, `context_embedder`), the adaLN linears of every block (`*.norm1.linear`, "
     "`*.norm1_context.linear`), or both also kept in full precision; calibration seed 0."),
    ("data_parallel.md", "Data-parallel calibration",
     "`python benchmarks/data_parallel.py --repeats 3 --iters 25` (`benchmarks/results/data_parallel.{md,json}`): "
     "the main job's AccuQuant phase (25 of its 100 iterations, the per-step start cached), timed from the saved "
     "model's own timing, nothing else running."),
    ("data_parallel_per-step.md", "Data-parallel calibration: per-step",
     "`python benchmarks/data_parallel.py --method per-step --iters 50 --args \"--act-iters 0\" --repeats 3` "
     "(`benchmarks/results/data_parallel_per-step.{md,json}`): the per-step method's phase, block capture "
     "included (50 AdaRound iterations per block, no activation phase, so that the capture, split over the "
     "ranks, weighs more than in the default), nothing else running. On these 2 cores two ranks of one thread "
     "are 1.59x one process of one thread but slower than one process of two threads (1.76x): per-step's batches "
     "of 32 rows (16 per rank) on one block are small pieces of work, the first batch of every block is "
     "captured by both ranks, and the ranks send each other every captured row; the split is for several "
     "GPUs, where each rank has its own device."),
    ("main_job.md", "Time of the main job",
     "`python benchmarks/main_job.py --repeats 3 --label \"default (2 threads)\"` and `--repeats 2 --label "
     "\"faster start (2 threads)\" --args \"--init-iters 150 --init-act-iters 0 --init-samples 16\"`, later "
     "`--repeats 3 --threads 2 --label \"default (2 threads), again\"` "
     "(`benchmarks/results/main_job.{md,json}`), nothing else running: where the main job's time goes, from an "
     "empty cache. The target of at most 150 s is missed: 365 s with the defaults (361 to 367 s; the row before "
     "is one run of the previous commit an hour earlier: this shared machine's speed drifts by 10% within the "
     "hour, as the per-step phase, unchanged code, shows). The summary no longer recomputes the naive method's "
     "ranges (per-step starts from naive's result and leaves it cached; about 12 s), which that drift hides. "
     "The row \"again\" is the same job on a later commit (the same computation in one process: per-step's "
     "capture split and the best-iterate option change nothing there, and it printed the same figures) later, "
     "when the machine was faster: 322 s (319 to 329 s), every phase shorter by 9 to 13%. "
     "What is left is compute: in that same hour the bundled UNet's FP forward pass took 2.10 ms per row at "
     "the summary's 64 rows, 65% of it in convolutions (`python benchmarks/main_job_parts.py`, below), and the "
     "summary's three sets of 300 samples (FP, AccuQuant, naive; 25.5 s, and 27.7 s for a fake-quantized model) "
     "are about 80 s on their own (the summary and start-up took 82 s), so 150 s would leave about 60 s for the "
     "per-step start and AccuQuant's 100 steps (234 s in that run). The channels-last memory format makes the "
     "FP forward pass 1.13x as fast (1.85 against 2.09 ms per row, the same process), about 10% of the job at "
     "best; it is not adopted because it changes the convolutions' float order, and with it every result "
     "measured on the UNet families (a learned rounding flips with summation order, \"Spread over calibration "
     "seeds\"), for less than a tenth of the time. AccuQuant's steps are still improving at the 100th (the "
     "ablation's rates: 3e-4 is worse, 3e-3 diverges). A cheaper per-step start (`--init-iters 150 --init-act-iters 0 --init-samples 16`: 150 AdaRound iterations per block "
     "instead of 300, no activation step-size phase, half the calibration points) takes 63 s instead of 150 s "
     "and brings the main job to 281 s; over calibration seeds 0 to 2 (\"Spread over calibration seeds\") and in "
     "the main job it gave a lower FID to FP than the defaults but a lower PSNR. "
     "The defaults stay (the other families' results were measured with them, and AccuQuant's start stays "
     "`--method per-step`'s own result, shared through the cache); the faster start is an option. "
     "Two ranks cut the AccuQuant phase 2.45x (\"Data-parallel calibration\"), but on 2 cores the summary would "
     "not gain and per-step is slower on two ranks of one thread than in one process of two (\"Data-parallel "
     "calibration: per-step\"). The exact gradient (`--grad exact`) saves the checkpoint gradient's extra "
     "forward pass: 25 AccuQuant steps took 19.0 and 19.6 s against 22.9 and 22.5 s (runs in turn, 2 threads, "
     "the start cached), so about 17 s of the main job; it is not the default, because its memory grows with "
     "M and its float order differs (a new result to measure over seeds for 5% of the time)."),
    ("main_job_parts.md", "The main job's fixed costs",
     "`python benchmarks/main_job_parts.py` (`benchmarks/results/main_job_parts.{md,json}`), nothing else "
     "running, 2 threads: the FP forward pass of the bundled UNet, and the parts of the quality summary."),
    ("seed_spread.md", "Spread over calibration seeds",
     "`python benchmarks/seed_spread.py --seeds 0,1,2,3,4` (and `--label ... --args ...` per variant; "
     "`benchmarks/results/seed_spread.{md,json}`): the main job (AccuQuant W4A8 on the bundled model) quantized "
     "with calibration seeds 0 to 4, one thread per job, two jobs at a time, each scored on the same 300 paired "
     "samples (evaluation seed 0). The seed alone moves AccuQuant's FID to FP by 1.9x (0.48 to 0.89), more than "
     "the run-to-run float differences between machines and thread counts (0.80 with two threads, 0.88 with one, "
     "0.63 on an AVX2 machine, all seed 0). Damping the last iterates does not make it steadier: a cosine rate "
     "from 2e-3 (the same mean rate as the default's constant 1e-3) lowers the median (0.58 against 0.67) but "
     "moves single seeds both ways (better on 3 of 5, worse on 2) and leaves the range as wide (0.49 to 0.99); a "
     "cosine rate from 1e-3 with the mean of the last half of the iterates is worse on both seeds it ran (1.12 and "
     "1.20 against 0.88 and 0.89): the optimisation is still improving at its 100th step (the ablation's rates "
     "agree: 3e-4 is worse, 3e-3 diverges), so what varies between seeds is where the per-step start and the "
     "calibration batches lead, not the noise of the last steps. The defaults stay (`--lr-decay` and `--average` "
     "were later removed). The faster per-step start (`--init-iters 150 --init-act-iters 0 --init-samples 16`, "
     "\"Time of the main job\") ran on seeds 0 to 2: FID to FP 0.770, 0.715 and 0.662 against the defaults' 0.877, 0.889 and 0.670 on the same seeds (lower on each), PSNR 33.85, 34.01 and 34.17 dB against 34.75, 34.49 and 35.60 (lower on each, by 0.5 to 1.4 dB). In the main job itself (two threads, seed 0) it printed 0.591 / 34.27 dB against the defaults' 0.802 / 34.59 dB. "
     "Keeping the best iterate by the sampling error of 8 held-out trajectories (`--select-every 10`: the start "
     "and every 10th iterate scored) did not make it steadier either: FID to FP 1.170, 0.944, 0.436, 0.535 and "
     "1.114 on seeds 0 to 4 (median 0.94, 0.44 to 1.17, against the defaults' 0.67, 0.48 to 0.89), PSNR median "
     "34.75 dB as the defaults'. Its scores show that the iterates do move late: the held-out error of scored "
     "iterates 10 steps apart differs by up to 2x after step 50 (seed 4: 0.00133 at step 70, 0.00273 at 80, "
     "0.00152 at 90), but the choice made on 8 trajectories does not carry over to 300 samples (seed 4's chosen "
     "70th iterate scored 1.11), and holding 8 of the 64 trajectories out also changes every batch. The chosen "
     "iterate was the 70th to the 100th on every seed, never the per-step start, whose held-out error was 1.9 "
     "to 15 times the chosen iterate's (0.0015 to 0.0203 by seed). It was later removed (off by default, no gain)."),
    ("memory_sd.md", "Memory at Stable Diffusion size",
     "`python benchmarks/memory_sd.py` (`benchmarks/results/memory_sd.{md,json}`): a UNet with SD-1.5's "
     "configuration, random weights, 8x8 latents (activations scale with the latent's area; weights and the "
     "77-token text embeddings do not; 64x64 would take hours per collection on 2 cores), while other jobs ran "
     "(memory, not time). Collection streams each batch to the file, so its peak does not grow with the number "
     "of prompts; the capture keeps at most `--max-memory` of block data in RAM; an AccuQuant step's memory does "
     "not grow with M (checkpoint gradient: one step's activations at a time). Most of a step's memory is the "
     "weight quantizers' autograd state, not activations: with the weight codes fixed (AccuQuant's default, "
     "which keeps the per-step start's codes and learns the step sizes), the step held 6870 MB above the model "
     "when the step size's gradient went through plain autograd, which saves a float copy of `codes - z` per "
     "layer (this script run on the previous commit, `--prompts 4 --budgets \"\" --ms \"\" --out "
     "results/memory_sd_plain_autograd`: `benchmarks/results/memory_sd_plain_autograd.{md,json}`), and "
     "3592 MB since the quantizer's backward recomputes it from the int16 codes it already holds (the row "
     "above; the same gradient bit for bit, tested)."),
    ("w4a4.md", "W4A4 with outlier handling on every bundled family",
     "Runs of `python benchmarks/ablation.py --model MODEL --bits w4a4 --seeds 0,1,2 --num 500 --paired-seeds --out results/w4a4_<model> --variants "
     "\"svdquant-like r=32:init=per-step,iters=0,$O,outliers=smooth|lowrank,rank=32;accuquant r=32:$O,"
     "outliers=smooth|lowrank,rank=32\"` with `O=attn_bits=8,softmax_bits=8,act_granularity=token,weight_group=64` "
     "(other rows: their options are in each w4a4_<model>.json), then `python benchmarks/w4a4_table.py` "
     "(`benchmarks/results/w4a4.{md,json}`). The SVDQuant-like row is `--method svdquant` at these options: "
     "per-step calibration with SVDQuant's smoothing, rank-32 branch and groups of 64, learned per block; the "
     "AccuQuant row starts from it and learns the step sizes and clipping factors under its multistep loss, "
     "keeping the smoothing scales and branch factors as per-step left them (its default; 'learn branch' and "
     "§ rows learn them too). On the U-Nets the same two rows also ran with `conv_outliers=true` (labels and "
     "families named 'conv'). Per-step W4A8 is the compare table's, on the same paired samples, and for "
     "mnist-ddpm a per-step W4A8 row of its own file at 500 samples. FID to FP is followed by its 95% bootstrap "
     "interval where the run recorded one (runs since the interval was added). " + W4A4_WIDTHS),
    ("act_sensitivity_mnist-sd.md", "Which layer inputs 4-bit activations hurt: mnist-sd",
     "`python benchmarks/act_sensitivity.py --model mnist-sd` (`benchmarks/results/act_sensitivity_<model>.{md,json}`;"
     " `--model mnist-sd3` writes the MMDiT's, to compare its summed rise): the measure `--act-mixed-precision` "
     "allocates by, each layer's input alone at 4 bits."),
    ("w4a4_rotate_mnist-flux.md", "mnist-flux at W4A4 with rotation: the first runs, 300 samples",
     "`python benchmarks/ablation.py --model mnist-flux --bits w4a4 --num 300 --seeds 0 --out "
     "results/w4a4_rotate_mnist-flux --variants ...` (`benchmarks/results/w4a4_rotate_mnist-flux.{md,json}`, the "
     "options of each row in the json): one calibration seed, 300 paired samples on sample seed 0. "
     "Every row keeps the attention matmuls' inputs at 8 bits (`attn_bits=8,softmax_bits=8`); every other layer "
     "input is at 4 bits, every quantized weight at 4. Plain rows: per-tensor static activation ranges, one weight "
     "range per output channel. `token+groups+outliers` rows: activations per token (dynamic), weights per group "
     "of 64 inputs, and smoothing, Hadamard rotation and a low-rank FP branch (rank 8 where the label gives none, "
     "else r=R; r=0: no branch). A `per-step` row with those options is per-step with SVDQuant's options plus "
     "rotation; `M=4` rows are AccuQuant from it. Measured before rotations were folded into V (every rotation "
     "online, in blocks of up to 256) and with AccuQuant version 3, which learned the smoothing scales and branch "
     "factors beside the step sizes."),
    ("families_full_size.md", "The families at their published size",
     "`python benchmarks/families_full_size.py --threads 1 --step-blocks sana=4,wan=6 --families "
     "pixart-sigma,flux,sd35-large,wan,sana`, then `--families sd35-medium --step-blocks sd35-medium=4 --skip speed` "
     "and `--families sdxl --skip speed,step,step_build` "
     "(`benchmarks/results/families_full_size.{md,json}`): each family's published denoiser configuration, "
     "random-initialised (no weights can be downloaded here; memory and speed do not depend on the values), on "
     "one CPU thread while another single-thread job ran on the second core (times are indicative; memory is "
     "not affected). FLUX.1-dev (12 B parameters) and SD3.5 Large (8 B) do not fit 24 GB in float32: they run "
     "the published blocks, fewer of them, with per-block figures and the published depth's estimate. Every "
     "family quantizes end to end (naive W8A8) at its published size except those two. An AccuQuant step holds "
     "about 13 bytes per parameter above the model in float32 (PixArt-Σ: 8.2 GB above its 0.61 B parameters; "
     "mostly the weights' fake-quantization graph), so at full size a step of Wan 2.1 1.3B, Sana 1600M, SD3.5 "
     "Medium or SDXL would need about 18 to 34 GB above the model: the first three's steps ran with the blocks "
     "named in their row, on their own build and calibration data; SDXL's step and the int8 timing of SD3.5 "
     "Medium and SDXL were not measured, to fit the time at hand (`--skip`; `--step-blocks sdxl=1` runs SDXL's "
     "step with at most one transformer layer per attention block). The target is the M = 4 / M = 1 ratio of "
     "the step's memory; on this machine's CPU (AMD "
     "EPYC exposing AVX2 without VNNI) the int8 kernels cannot take 8-bit weights, so its int8 column times the "
     "fake fallback (the layers-on-int8 count says so), and bf16 autocast, without AVX512-BF16, is 5 to 12 times "
     "slower than float32."),
    ("int8_speed.md", "Speed of the int8 backend",
     "`python benchmarks/int8_speed.py --threads 1,2 --repeats 3` (`benchmarks/results/int8_speed.{md,json}`), "
     "nothing else running. The target (int8 at least 2x float32 and at least as fast as bf16 on the SD-1.5-size "
     "UNet) is missed: int8 is 1.82x to 2.04x float32 there, bf16 autocast 2.6x to 2.7x. What is left of the int8 "
     "call is float work that the quantized model must do exactly as `fake` does to stay within float rounding of "
     "it: the attention scores (Q.K^T in float32, softmax) and the probabilities' codes, which need float32 "
     "scores to be the same codes, and each layer's input rounded to its codes; bf16 autocast does all of its "
     "arithmetic, attention included, in bf16. On the bundled 1.1 M-parameter model int8 is slower than float32: "
     "its layers are too small for the kernels to pay for quantizing their inputs."),
    ("int8_speed_avx2.md", "Speed on a CPU without VNNI or bf16 (AVX2)",
     "`python benchmarks/int8_speed.py --models sd15-unet:w4a8,dit-xl-2:w4a8 --threads 1,2 --repeats 3 --openvino "
     "--out benchmarks/results/int8_speed_avx2` on an AMD EPYC exposing AVX2 only, nothing else running: the denoiser "
     "call on `fake`, `int8` and `packed` against float32, and OpenVINO (2026.4, the benchmark extra) on the FP "
     "model. bf16 autocast is not timed: without AVX512-BF16 or AMX its convolutions run emulated, about 100x "
     "slower than float32 here (a 640-channel 3x3 conv at 32x32: 40.9 s against 0.40 s), and OpenVINO compiles "
     "in float32 (the CPU reports no bf16). Without VNNI the int8 kernels saturate on 8-bit weight codes, so "
     "W8A8 runs on `fake` here and only W4A8 reaches the integer kernels: there `int8` is 1.28x to 1.61x float32 and "
     "1.09x to 1.79x OpenVINO's float32. The target "
     "(1.3x bf16 autocast) needs a CPU with bf16 arithmetic to be measured against; on this one the reference "
     "that users have is float32 PyTorch and OpenVINO."),
    ("int8_speed_compile_avx2_sd15.md", "Compiled (torch.compile) on the AVX2 CPU: SD-1.5 UNet",
     "`python benchmarks/int8_speed.py --models sd15-unet:w4a8 --threads 1,2 --repeats 3 --also '' --compile --out "
     "benchmarks/results/int8_speed_compile_avx2_sd15` (OpenVINO left out: with it the process ran out of the "
     "machine's 24 GB). `Pipeline.compile` / `speed --compile`: Inductor fuses the float work around oneDNN's "
     "int8 layers (input rounding, bias, GroupNorm and SiLU, the attention's softmax). On this CPU it adds little: "
     "the int8 kernels and the float convolutions dominate the call, and compiling gives float32 1.05x to 1.11x "
     "and int8 a few percent. The compilation, in the first call, is reported apart."),
    ("int8_speed_compile_avx2.md", "Compiled (torch.compile) on the AVX2 CPU: DiT-XL/2",
     "`python benchmarks/int8_speed.py --models dit-xl-2:w4a8 --threads 1,2 --repeats 3 --also '' --openvino "
     "--compile --out benchmarks/results/int8_speed_compile_avx2`, OpenVINO in the same process. Here compiling "
     "pays: int8 compiled is 1.83x and 1.94x float32 (eager int8 1.66x and 1.69x) and 1.81x and 1.73x OpenVINO's "
     "float32; the attention, under compile, is the plain arithmetic fused by Inductor. Compiling took 290 s, "
     "and again 308 s at the second thread count (a new thread count compiles anew)."),
    ("deploy_memory.md", "Memory of a deployed model",
     "`python benchmarks/deploy_memory.py` (`benchmarks/results/deploy_memory.{md,json}`). The target (W4A8 "
     "weights at most 0.15x float32's in memory, SD-1.5 size) is met by the `packed` backend; `fake` holds its "
     "float32 weights once (no more than the FP model); `int8` holds oneDNN's prepacked int8 weights, one byte "
     "per weight, since its kernels take no 4-bit weights and prepacking a layer on every call costs more than "
     "the call on the large convolutions (a 1280-channel 3x3 conv at 8x8: 52 ms to prepack, 31 ms to run)."),
    ("lora_quality.md", "A style LoRA on the quantized mnist-sd",
     "`python training/train_lora_thick.py --data mnist10k.npz --out runs/lora-thick`, then "
     "`python benchmarks/lora_quality.py --lora runs/lora-thick` (`benchmarks/results/lora_quality.{md,json}`). "
     "The target: the quantized model with the LoRA at most 1.5x as far (FID) from FP + LoRA as the quantized "
     "model without it is from FP."),
    ("torchao_export.md", "The torchao export",
     "`python benchmarks/torchao_export.py --num 100` (`benchmarks/results/torchao_export.{md,json}`; CPU and "
     "threads in the file). With the attention matmuls in float (`-attnfp`, all the export can carry), the static "
     "export is as close to the quantized model as the quantized model is to itself sampled one image at a time "
     "(float sums in another order move a few activations across a rounding boundary); with quantized attention, "
     "the attention is what the export lacks. Weights only (`float`) is nearer FP but is not the calibrated "
     "network. torchao runs the static int8 matmul through `torch._int_mm`, slow in eager mode on a CPU without "
     "VNNI or AMX."),
    ("reliability.md", "Reliability",
     "`python benchmarks/kill_resume.py --trials 10`, then `python benchmarks/reliability.py --pairs 3` "
     "(`benchmarks/results/kill_resume.json`, `reliability.{md,json}`)."),
    ("memory.md", "Memory of one AccuQuant step",
     "`python benchmarks/memory.py` (`benchmarks/results/memory.md`): one optimisation step over M steps, 8 "
     "trajectories (16 rows with guidance), W4A8; peak resident memory during the step minus the memory before "
     "it, its ratio to M = 1, and the step's time; medians of 3 fresh processes run with "
     "`MALLOC_MMAP_THRESHOLD_=131072`."),
]


def render() -> str:
    res = _load(RESULTS / "compare.json")
    seeds = _load(RESULTS / "compare_seeds.json")
    s = res["settings"]
    n_cached = res.get("cache_files_at_start")  # not recorded by older versions of compare
    cache = {None: "", 0: ", from an empty cache"}.get(n_cached, ", reusing cached calibration data and results")
    one_go = len(res["run_now"]) == len(res["runs"])  # all pairs in one invocation: its wall time
    minutes = (res["wall_s"] if one_go else sum(r["pair_wall_s"] for r in res["runs"])) / 60
    parts = [BEGIN, "",
             "### All methods and bit widths: `accuquant compare`", "",
             f"`accuquant compare --num {s['num']} --analyze-num {s['analyze_num']} --out runs/compare` on the "
             f"bundled model ({s['scheduler'].upper()} {s['steps']} steps, calibration on {s['calib_samples']} FP "
             f"trajectories, seed {s['seed']}, every method with its defaults){cache}: "
             f"{minutes:.0f} min for the {len(res['runs'])} pairs on the 2-core machine "
             f"({res['versions']['cpu_threads']} thread per process). Table, figures and "
             "`results.json` are its output (`benchmarks/results/compare.md`, `compare.json`, `docs/compare/`).", "",
             markdown_table(res), "", NOTES, ""] + _ratio_lines(res) + [""]
    for bits in s["bits"]:
        parts += [f"**{bits.upper()}**: samples from the same seeds and labels, and the error along sampling "
                  "(accumulated distance to the FP trajectory, solid; per-step network error on FP inputs, dashed; "
                  "FID to FP of the predicted x0 at each step, right).", "",
                  f"![samples at {bits}](docs/compare/grid-{bits}.png)", "",
                  f"![error along sampling at {bits}](docs/compare/errors-{bits}.png)", ""]
    seed_list = ", ".join(str(x["settings"]["seed"]) for x in seeds)
    parts += ["### Calibration seeds", "",
              f"The same comparison with calibration seeds {seed_list} (each `accuquant compare --seed N`, "
              f"{s['num']} paired samples; `benchmarks/results/compare_seeds.json`): mean (min..max) over the "
              "seeds, and AccuQuant's FID to FP as a ratio of per-step's, seed by seed.", ""]
    parts += seed_section(seeds) + [""]
    for name, title, text in OTHER_TABLES:
        if (RESULTS / name).exists():
            parts += [f"### {title}", "", text, ""] + _table_lines(RESULTS / name) + [""]
    parts.append(END)
    return "\n".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", default=None, help="an accuquant compare output directory to import")
    p.add_argument("--seeds", default="", help="comma-separated compare directories with other calibration seeds")
    args = p.parse_args()
    if args.compare:
        import_compare(Path(args.compare), [Path(d) for d in args.seeds.split(",") if d])
    text = README.read_text()
    if BEGIN not in text or END not in text or MODELS_BEGIN not in text or MODELS_END not in text:
        print("readme_results: the README has no results or models markers", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    text = head + render() + tail
    head, rest = text.split(MODELS_BEGIN, 1)
    _, tail = rest.split(MODELS_END, 1)
    README.write_text(head + MODELS_BEGIN + "\n" + models_table() + "\n" + MODELS_END + tail)
    print(f"rewrote the results section of {README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
