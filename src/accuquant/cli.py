"""The ``accuquant`` command line: ``quantize``, ``sample``, ``evaluate`` and ``analyze``.

Every problem with the input ends with one line on stderr and exit status 2; a failure
of the machine (a full disk, a permission) with one line and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import AccuQuantError
from .safety import check_device

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"accuquant: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _bits_or_act(text: str) -> int | str | None:
    return "act" if text == "act" else _bits(text)


def _bits(text: str) -> int | None:
    if text.lower() in ("none", "fp", "float"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit width (2 to 8, 16/32 or none), got {text!r}") from None


def _labels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class labels, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _non_negative(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = 0.0
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


#: the learning flags each method takes (``--batch-size`` is also every method's pass size)
METHOD_FLAGS = {
    "per-step": ("iters", "lr", "act_iters", "act_lr", "samples_per_step"),
    "accuquant": ("iters", "lr", "group_size", "grad", "init", "schedule", "rounding", "traj_batch"),
}


def _add_sampling_args(p: argparse.ArgumentParser, conditioning: bool = True) -> None:
    p.add_argument("--steps", type=_positive, default=None, help="sampling steps (default 20, or those a quantized "
                   "model was calibrated for)")
    p.add_argument("--scheduler", default=None, help="ddim, ddpm, pndm (plms) or dpm++ (default ddim, or the one "
                   "a quantized model was calibrated for)")
    if conditioning:  # evaluation always uses the model's own guidance and balanced labels
        p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: the "
                       "model's)")
        p.add_argument("--labels", type=_labels, default=None, help="class labels, comma-separated (default: balanced)")
        p.add_argument("--prompt", action="append", default=None, help="prompt for text-conditioned models "
                       "(repeatable)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--batch-size", type=_positive, default=None, help="samples per forward pass (default 32); "
                   "accuquant: trajectories per optimisation step (default 8)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="accuquant", description="Post-training quantization of diffusion models.")
    parser.add_argument("--version", action="version", version=f"accuquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a diffusers model and save it")
    q.add_argument("--model", default=None, help="diffusers pipeline or model directory, or hub id "
                   "(default: the bundled MNIST model)")
    q.add_argument("--method", default="accuquant", help="calibration method: naive, per-step or accuquant "
                   "(default accuquant)")
    q.add_argument("--weight-bits", type=_bits, default=4, help="2..8, or none (default 4)")
    q.add_argument("--act-bits", type=_bits, default=8, help="2..8, or none (default 8)")
    q.add_argument("--attn-bits", type=_bits_or_act, default="act", help="bits of attention matmul inputs, 2..8 or "
                   "none (default: act, the activation bits)")
    q.add_argument("--softmax-bits", type=_bits_or_act, default="act", help="bits of the softmax output, 2..8 or none "
                   "(default: act, the activation bits)")
    q.add_argument("--weight-symmetric", action="store_true", help="symmetric weight grid (default affine)")
    q.add_argument("--keep-fp", action="append", default=None, help="module-name pattern kept in full precision "
                   "(repeatable; replaces the default conv_in/conv_out)")
    q.add_argument("--no-split-shortcut", action="store_true", help="do not split concatenated shortcut inputs")
    q.add_argument("--calib-samples", type=_positive, default=64, help="calibration trajectories (default 64)")
    q.add_argument("--calib", default=None, help="saved calibration trajectories (safetensors) to reuse")
    q.add_argument("--no-cache", action="store_true", help="do not reuse or cache calibration trajectories")
    q.add_argument("--out", default=None, help="output directory (default runs/<model>-<method>-w<W>a<A>)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    q.add_argument("--summary", type=_non_negative, default=None, help="after saving, compare with FP and with the "
                   "naive method on this many paired samples (default 300 for the bundled model, else 0: off)")
    learn = q.add_argument_group("learning methods (per-step, accuquant)")
    learn.add_argument("--iters", type=_non_negative, default=None, help="per-step: AdaRound iterations per block "
                       "(default 300); accuquant: optimisation steps (default 100)")
    learn.add_argument("--lr", type=_positive_float, default=None, help="per-step: learning rate of the rounding "
                       "variables (default 1e-2); accuquant: learning rate relative to each step size (default 1e-3)")
    learn.add_argument("--group-size", type=_positive, default=None, help="accuquant: denoising steps simulated "
                       "per group, M (default 4)")
    learn.add_argument("--grad", default=None, help="accuquant: gradient through a group, exact, checkpoint or "
                       "approx (default checkpoint)")
    learn.add_argument("--init", default=None, help="accuquant: starting point, per-step or naive "
                       "(default per-step)")
    learn.add_argument("--schedule", default=None, help="accuquant: order of groups, uniform (random) or cycle "
                       "(default uniform)")
    learn.add_argument("--rounding", default=None, help="accuquant: weight rounding, keep (the initialisation's "
                       "integer codes; the step sizes scale them) or learn (AdaRound variables learned jointly "
                       "with the step sizes; default keep)")
    learn.add_argument("--act-iters", type=_non_negative, default=None, help="per-step: activation step-size "
                       "iterations per block (default 100)")
    learn.add_argument("--act-lr", type=_positive_float, default=None, help="per-step: learning rate of activation "
                       "step sizes, relative to each step size (default 1e-3)")
    learn.add_argument("--samples-per-step", type=_positive, default=None, help="per-step: calibration points per "
                       "sampling step (default 32)")
    learn.add_argument("--resume", action="store_true", help="continue an interrupted calibration with the same "
                       "settings from its last checkpoint")
    _add_sampling_args(q)

    s = sub.add_parser("sample", help="sample a grid of images from a (quantized) model")
    s.add_argument("--model", default=None, help="accuquant output directory, or a diffusers model "
                   "(default: the bundled MNIST model)")
    s.add_argument("--num", type=_positive, default=16, help="number of samples (default 16)")
    s.add_argument("--nrow", type=_positive, default=None, help="images per grid row")
    s.add_argument("--out", required=True, help="output PNG file")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _add_sampling_args(s)
    e = sub.add_parser("evaluate", help="paired metrics of a quantized model against its FP base")
    e.add_argument("--model", default=None, help="accuquant output directory, or an FP model (default: bundled)")
    e.add_argument("--base", default=None, help="the FP base model (default: the one recorded at quantization)")
    e.add_argument("--num", type=_positive, default=1000, help="paired samples (default 1000)")
    e.add_argument("--features", default="auto", help="feature network: auto, digits or inception")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--lpips", action="store_true", help="also LPIPS (needs the lpips package and its weights)")
    e.add_argument("--no-cache", action="store_true", help="do not reuse or cache FP samples")
    _add_sampling_args(e, conditioning=False)

    a = sub.add_parser("analyze", help="error accumulation per sampling step (CSV and plot)")
    a.add_argument("--model", required=True, help="accuquant output directory")
    a.add_argument("--base", default=None, help="the FP base model (default: the one recorded at quantization)")
    a.add_argument("--num", type=_positive, default=500, help="paired trajectories (default 500)")
    a.add_argument("--features", default="auto", help="feature network for FID2FP of x0: auto, digits or inception")
    a.add_argument("--out", required=True, help="output prefix: writes PREFIX.csv and PREFIX.png")
    a.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_sampling_args(a, conditioning=False)

    c = sub.add_parser("compare", help="quantize with several methods and bit widths and write one report")
    c.add_argument("--model", default=None, help="diffusers pipeline or model directory (default: the bundled "
                   "MNIST model)")
    c.add_argument("--methods", default="naive,per-step,accuquant", help="comma-separated methods (default "
                   "naive,per-step,accuquant)")
    c.add_argument("--bits", default="w8a8,w4a8,w3a8,w4a6", help="comma-separated bit widths w<W>a<A> (default "
                   "w8a8,w4a8,w3a8,w4a6)")
    c.add_argument("--num", type=_positive, default=1000, help="paired samples per evaluation (default 1000)")
    c.add_argument("--analyze-num", type=_positive, default=256, help="paired samples for the error curves "
                   "(default 256)")
    c.add_argument("--grid", type=_positive, default=10, help="samples per row of the sample grids (default 10)")
    c.add_argument("--steps", type=_positive, default=20, help="sampling steps (default 20)")
    c.add_argument("--scheduler", default="ddim", help="ddim (default), ddpm, pndm (plms) or dpm++")
    c.add_argument("--calib-samples", type=_positive, default=64, help="calibration trajectories (default 64)")
    c.add_argument("--seed", type=int, default=0, help="calibration and noise seed (default 0)")
    c.add_argument("--out", default="runs/compare", help="output directory (default runs/compare); a rerun with "
                   "the same settings skips the pairs already done")
    c.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _compare(args) -> None:
    from .bundled import model_ref
    from .compare import CompareSettings, run_compare
    from .safety import check_device

    from .report import markdown_table

    _check_scheduler(args.scheduler)
    check_device(args.device)
    model = _model_arg(args)
    settings = CompareSettings(
        model=model_ref(model) if Path(model).exists() else model,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        bits=[b.strip().lower() for b in args.bits.split(",") if b.strip()],
        num=args.num, steps=args.steps, scheduler=args.scheduler, calib_samples=args.calib_samples, seed=args.seed,
        analyze_num=args.analyze_num, grid=args.grid, device=args.device)
    results = run_compare(settings, args.out, quiet=args.quiet)
    print(markdown_table(results))
    print(f"wrote {Path(args.out) / 'report.md'}, report.html and results.json ({results['wall_s']:.0f} s)")


def _model_arg(args) -> str:
    from .bundled import DEFAULT_MODEL

    return args.model if args.model is not None else str(DEFAULT_MODEL)


def _check_scheduler(name: str | None) -> None:
    from .sampling import solver_class

    if name is not None:
        solver_class(name)


def _evaluate(args) -> None:
    import json

    from .evaluation import evaluate, format_table, to_json_safe
    from .pipeline import load_pipeline

    check_device(args.device)
    _check_scheduler(args.scheduler)
    model = load_pipeline(_model_arg(args), device=args.device)
    r = evaluate(model, args.base, num=args.num, steps=args.steps, seed=args.seed, scheduler=args.scheduler,
                 features=args.features, batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                 use_cache=not args.no_cache, lpips=args.lpips)
    print(json.dumps(to_json_safe(r)) if args.json else format_table(r))


def _analyze(args) -> None:
    from .analysis import error_accumulation, plot, write_csv
    from .pipeline import load_pipeline

    check_device(args.device)
    _check_scheduler(args.scheduler)
    csv_path, png_path = Path(args.out + ".csv"), Path(args.out + ".png")
    for p in (csv_path, png_path):
        if p.exists() and not args.overwrite:
            raise AccuQuantError(f"{p}: exists (pass --overwrite to replace it)")
    model = load_pipeline(args.model, device=args.device)
    rows = error_accumulation(model, args.base, num=args.num, steps=args.steps, seed=args.seed,
                              scheduler=args.scheduler, features=args.features, batch_size=args.batch_size,
                              device=args.device, progress=not args.quiet)
    name = (model.quant or {}).get("method", "fp")
    cfg = (model.quant or {}).get("config", {})
    label = f"{name} W{cfg.get('weight_bits') or 'fp'}A{cfg.get('act_bits') or 'fp'}"
    plot({label: rows}, png_path, title=f"{label}: {args.num} paired trajectories")
    write_csv(rows, csv_path)
    last = rows[-1]
    print(f"wrote {csv_path} and {png_path}; last step: step error {last['step_error']:.4f}, "
          f"accumulated error {last['accumulated_error']:.4f}")


def _quantize(args) -> None:
    from .config import QuantConfig
    from .engine import quantize
    from .methods import check_method_options, get_method
    from .safety import check_out_dir

    check_device(args.device)
    args.steps = args.steps or 20
    args.scheduler = args.scheduler or "ddim"
    kw = {}
    if args.keep_fp is not None:
        kw["keep_fp"] = tuple(args.keep_fp)
    cfg = QuantConfig(
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
        attn_bits=args.attn_bits,
        softmax_bits=args.softmax_bits,
        weight_symmetric=args.weight_symmetric,
        split_shortcut=not args.no_split_shortcut,
        **kw,
    )
    get_method(args.method)
    _check_scheduler(args.scheduler)
    takes = METHOD_FLAGS.get(args.method, ())
    options = {k: v for k, v in vars(args).items() if k in _ALL_FLAGS and v is not None}
    wrong = sorted(k for k in options if k not in takes)
    if wrong:
        raise AccuQuantError(f"{_flag_list(wrong)}: not an option of the {args.method} method"
                             + ("; it learns nothing" if not takes else f" (it takes {_flag_list(takes)})"))
    if "traj_batch" in takes and args.batch_size_given is not None:
        options["traj_batch"] = args.batch_size_given  # accuquant: --batch-size is its optimisation batch
    check_method_options(args.method, options)
    model_path = _model_arg(args)
    bundled = args.model is None
    bits = f"w{cfg.weight_bits or 'fp'}a{cfg.act_bits or 'fp'}"
    out = Path(args.out) if args.out else Path("runs") / f"{Path(model_path).name}-{args.method}-{bits}"
    summary = args.summary if args.summary is not None else (300 if bundled else 0)
    check_out_dir(out, args.overwrite)  # refuse before the long work, not after
    t0 = time.perf_counter()
    common = dict(steps=args.steps, scheduler=args.scheduler, calib_samples=args.calib_samples, seed=args.seed,
                  guidance_scale=args.guidance_scale, labels=args.labels, prompts=args.prompt,
                  batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                  use_cache=not args.no_cache)
    pipe = quantize(model_path, cfg, args.method, args.calib, inplace=True, resume=args.resume, **common, **options)
    pipe.save(out, overwrite=args.overwrite)
    report = pipe.quant["report"]
    wfile = out / pipe.denoiser_name / "accuquant_weights.safetensors"
    print(f"quantized {pipe.denoiser_name} with {args.method} at W{cfg.weight_bits or 'fp'}A{cfg.act_bits or 'fp'}: "
          f"{len(report['quantized'])} layers ({len(report['split'])} shortcut-split), "
          f"{len(report['attention'])} attention blocks; kept in full precision: {', '.join(report['kept_fp']) or 'none'}")
    print(f"saved {out} (weights {os.path.getsize(wfile) / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s")
    if summary:
        _summary(pipe, model_path, cfg, args, common, summary)


def _flag_list(names) -> str:
    return ", ".join("--" + k.replace("_", "-") for k in names)


_ALL_FLAGS = sorted({k for v in METHOD_FLAGS.values() for k in v})


def _summary(pipe, model_path: str, cfg, args, common: dict, num: int) -> None:
    """Paired quality against FP, next to the naive method's at the same bits."""
    from .engine import quantize
    from .evaluation import evaluate
    from .pipeline import load_pipeline

    fp = load_pipeline(model_path, device=args.device)
    ev = dict(num=num, steps=args.steps, seed=args.seed, scheduler=args.scheduler, batch_size=args.batch_size,
              device=args.device, progress=not args.quiet)
    rows = {args.method: evaluate(pipe, fp, **ev)}
    if args.method != "naive":
        naive = quantize(fp, cfg, "naive", args.calib, **{**common, "progress": False})
        rows["naive"] = evaluate(naive, fp, **ev)
    print(f"quality against FP on {num} paired samples ({args.steps} {args.scheduler} steps, seed {args.seed}):")
    for name, r in rows.items():
        print(f"  {name:>10}: fid2fp {r['fid2fp']:8.3f}  psnr {r['psnr']:6.2f} dB  ssim {r['ssim']:.4f}")


def _sample(args) -> None:
    from .images import save_grid
    from .pipeline import load_pipeline

    check_device(args.device)
    _check_scheduler(args.scheduler)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise AccuQuantError(f"{out}: exists (pass --overwrite to replace it)")
    if out.suffix.lower() != ".png":
        raise AccuQuantError(f"{out}: the grid is written as PNG; use a .png name")
    pipe = load_pipeline(_model_arg(args), device=args.device)
    args.steps, args.scheduler = pipe.sampling_settings(args.steps, args.scheduler)
    x = pipe.sample(args.num, seed=args.seed, steps=args.steps, scheduler=args.scheduler, labels=args.labels,
                    prompts=args.prompt, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                    device=args.device, progress=not args.quiet)
    save_grid(pipe.decode(x.to(args.device)), out, args.nrow)
    print(f"wrote {out} ({args.num} samples, {args.steps} {args.scheduler} steps)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    args.batch_size_given = getattr(args, "batch_size", None)
    args.batch_size = args.batch_size_given or 32
    try:
        {"quantize": _quantize, "sample": _sample, "evaluate": _evaluate, "analyze": _analyze,
         "compare": _compare}[args.command](args)
    except AccuQuantError as e:
        print(f"accuquant: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = ""
        if args.command == "quantize" and args.method != "naive":
            hint = " (rerun the same command with --resume to continue from the last checkpoint)"
        if args.command == "compare":
            hint = " for the pair in progress (rerun the same command: finished pairs are kept, and an " \
                   "interrupted calibration continues from its checkpoint)"
        print(f"accuquant: interrupted; nothing was written{hint}", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"accuquant: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
