"""``accuquant quantize``: quantize a diffusers model and save it; its quantization flags come
from :class:`~accuquant.config.QuantConfig`, its method flags from the methods' configs."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..config import DEFAULT_CALIB_SAMPLES, DEFAULT_MAX_MEMORY, DEFAULT_METHOD
from ..errors import AccuQuantError, check_device
from . import options as o

#: paired samples of the quality summary after quantizing the bundled model (others: none)
BUNDLED_SUMMARY = 300


def add_parser(sub) -> None:
    from ..methods import METHODS, RECIPES
    from ..methods.corrections import CORRECTIONS, SHORTHAND_BASE

    q = sub.add_parser("quantize", help="quantize a diffusers model and save it")
    q.add_argument("--model", default=None, help="diffusers pipeline or model directory, hub id, or "
                   + o.bundled_help())
    q.add_argument("--method", default=DEFAULT_METHOD, help=f"calibration method: {', '.join(METHODS)} "
                   f"(default {DEFAULT_METHOD}), or a recipe: "
                   + "; ".join(f"{n} ({base} with {_options_text(opts)} unless given)"
                               for n, (base, opts) in RECIPES.items())
                   + f"; METHOD+CORRECTION adds a sampling correction, and a correction alone "
                   f"({', '.join(CORRECTIONS)}) is {SHORTHAND_BASE} with it")
    q.add_argument("--correct", default=None, choices=list(CORRECTIONS), help="sampling correction, estimated on "
                   "the calibration trajectories, saved with the model and applied in every sampler step "
                   "(docs/methods.md)")
    quant = q.add_argument_group("quantization options (generated from QuantConfig)")
    o.add_quant_flags(quant, {"keep_fp": "; patterns given replace the family's, which are "
                              + o.family_keep_fp()})
    q.add_argument("--calib-samples", type=o.positive, default=DEFAULT_CALIB_SAMPLES, help="calibration "
                   f"trajectories (default {DEFAULT_CALIB_SAMPLES})")
    q.add_argument("--calib", default=None, help="saved calibration trajectories (safetensors) to reuse")
    q.add_argument("--no-cache", action="store_true", help="do not reuse or cache calibration trajectories")
    q.add_argument("--out", default=None, help="output directory (default runs/<model>-<method>-w<W>a<A>); not "
                   "the model's own directory, nor one inside it or holding it")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    q.add_argument("--summary", type=o.non_negative, default=None, help="after saving, compare with FP and with "
                   f"the naive method on this many paired samples (default {BUNDLED_SUMMARY} for the bundled model, "
                   "else 0: off)")
    learn = q.add_argument_group("method options (generated from each method's config)")
    o.add_method_flags(learn)
    learn.add_argument("--resume", action="store_true", help="continue an interrupted calibration with the same "
                       "settings from its last checkpoint")
    learn.add_argument("--micro-batches", type=o.positive, default=1, help="passes per optimisation batch "
                       "(gradient accumulation: less memory; default 1). Data-parallel: torchrun --nproc-per-node N "
                       "-m accuquant quantize ...")
    learn.add_argument("--max-memory", type=o.size, default=DEFAULT_MAX_MEMORY, help="RAM for the block data "
                       f"per-step captures (e.g. 4GB, 512MB; default {DEFAULT_MAX_MEMORY}); the rest goes to "
                       "temporary files, with the same result")
    o.add_sampling_args(q)


def _options_text(opts: dict) -> str:
    return " ".join(f"--{k.replace('_', '-')} {','.join(v) if isinstance(v, tuple) else v}" for k, v in opts.items())


def interrupt_hint(args) -> str:
    if args.method != "naive":
        return " (rerun the same command with --resume to continue from the last checkpoint)"
    return ""


def method_options(args) -> dict:
    """The method options given on the command line, by config field; a flag the method
    does not take is refused naming the ones it does."""
    from ..methods import base_method

    flags = o.method_flags()
    method = base_method(args.method)
    takes = {flag: f.name for flag, entries in flags.items() for m, f in entries if m == method}
    given = o.given(args, [f for f in flags if f != "batch-size"])
    if args.batch_size_given is not None:
        given["batch-size"] = args.batch_size_given
    wrong = sorted(flag for flag in given if flag not in takes and flag != "batch-size")
    if wrong:
        listed = ", ".join("--" + f for f in takes)
        raise AccuQuantError(f"{', '.join('--' + f for f in wrong)}: not an option of the {method} method"
                             + (f" (it takes {listed})" if takes else "; it learns nothing"))
    return {takes[flag]: v for flag, v in given.items() if flag in takes}


def run(args) -> None:
    from ..bundled import is_bundled
    from ..calibrate import distributed
    from ..io.files import check_not_inside, check_out_dir
    from ..methods import method_config, resolve_recipe, split_method

    check_device(args.device)
    args.correct = split_method(args.method, args.correct)[1]
    cfg = resolve_recipe(args.method, o.quant_config(args))[1]
    mconfig = method_config(args.method, method_options(args))  # validated before any work
    o.check_scheduler(args.scheduler)
    args.prompts = o.prompts(args)  # a bad prompt file is refused before any work
    model_path = o.model_arg(args)
    if args.summary:
        o.check_images("quantize --summary (image metrics)", model_path)
    out = Path(args.out) if args.out else Path("runs") / f"{Path(model_path).name}-{args.method}-{cfg.label}"
    check_not_inside(out, model_path)  # never replace (or write into) the model being read
    check_out_dir(out, args.overwrite, "--overwrite")  # refuse before the long work, not after
    bundled = is_bundled(model_path)
    if distributed.init_from_env(args.device):  # under torchrun: data-parallel, rank 0 writes and reports
        import torch.distributed as dist

        try:  # the other ranks leave once calibrated; a rank that fails ends, and torchrun stops the rest
            _quantize(args, model_path, cfg, mconfig, out, bundled, main=distributed.is_main())
        finally:
            dist.destroy_process_group()
        return
    _quantize(args, model_path, cfg, mconfig, out, bundled)


def _quantize(args, model_path, cfg, mconfig, out: Path, bundled: bool, main: bool = True) -> None:
    from ..api import quantize
    from ..config import DEFAULT_STEPS

    summary = args.summary if args.summary is not None else (BUNDLED_SUMMARY if bundled else 0)
    t0 = time.perf_counter()
    calib_options = dict(steps=args.steps or DEFAULT_STEPS, scheduler=args.scheduler,
                         calib_samples=args.calib_samples, seed=args.seed, guidance_scale=args.guidance_scale,
                         labels=args.labels, prompts=args.prompts, batch_size=args.batch_size, device=args.device,
                         use_cache=not args.no_cache)
    pipe = quantize(model_path, cfg, mconfig, args.calib, inplace=True, resume=args.resume, correct=args.correct,
                    micro_batches=args.micro_batches, max_memory=args.max_memory, progress=not args.quiet,
                    **calib_options)
    if not main:
        return
    pipe.save(out, overwrite=args.overwrite)
    report = pipe.quant.report
    wfile = out / pipe.denoiser_name / "accuquant_weights.safetensors"
    mixed = pipe.quant.method_log.get("mixed_precision")
    widths = ", ".join(f"{mixed[f'average_{k}_bits']:.2f} {k} bits" for k in ("weight", "act")
                       if f"average_{k}_bits" in (mixed or {}))
    widths = f" (mixed: {widths} on average)" if widths else ""
    print(f"quantized {pipe.denoiser_name} with {args.method} at W{cfg.weight_bits or 'fp'}A{cfg.act_bits or 'fp'}"
          f"{widths}: "
          f"{len(report.quantized)} layers ({len(report.split)} shortcut-split), "
          f"{len(report.attention)} attention blocks; kept in full precision: {', '.join(report.kept_fp) or 'none'}")
    print(f"saved {out} (weights {os.path.getsize(wfile) / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s")
    if pipe.quant.method_log.get("cached"):
        print("the calibration came from the cache: this method with its defaults had run on this model, bits, "
              "data and seed before (--no-cache runs it again)")
    if summary:
        _summary(pipe, model_path, args, calib_options, summary)


def _summary(pipe, model_path: str, args, calib_options: dict, num: int) -> None:
    """Print :func:`~accuquant.eval.evaluation.quality_summary`: paired quality against FP,
    next to the naive method's at the same bits, on the prompts quantize was given."""
    from ..eval.evaluation import quality_summary

    if pipe.denoiser(1.0).conditioning == "text" and not args.prompts and not pipe.defaults.prompts:
        print("no quality summary: a text model without default prompts is scored on the prompts given "
              "(--prompt, --prompt-file), and none were")
        return
    rows = quality_summary(pipe, model_path, num, seed=args.seed, prompts=args.prompts, batch_size=args.batch_size,
                           device=args.device, progress=not args.quiet, calib=args.calib,
                           calib_options=calib_options)
    r = rows[0]
    print(f"quality against FP on {num} paired samples ({r['steps']} {r['scheduler']} steps, seed {args.seed}):")
    for r in rows:
        print(f"  {r['method']:>10}: fid2fp {r['fid2fp']:8.3f}  psnr {r['psnr']:6.2f} dB  ssim {r['ssim']:.4f}")
