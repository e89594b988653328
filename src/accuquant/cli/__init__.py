"""The ``accuquant`` command line: ``quantize``, ``sample``, ``evaluate``, ``analyze``, ``compare``, ``speed``
and ``export``.

Every problem with the input, and every failed write (a full disk, a permission), ends with
one line on stderr and exit status 2, and leaves nothing half-written; an interrupt exits
with status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import typing
from pathlib import Path

from ..version import __version__
from ..errors import AccuQuantError
from ..errors import check_device
from ..io.files import check_writable

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


def _size(text: str) -> int:
    from ..config import parse_size

    try:
        return parse_size(text)
    except AccuQuantError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


def method_flags() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Command-line flag -> ``(method, config field)`` for every method option marked for the
    command line (several methods may share a flag, such as ``--iters``)."""
    from ..methods import METHODS

    flags: dict[str, list] = {}
    for name, cls in METHODS.items():
        for f in dataclasses.fields(cls.Config):
            if f.metadata.get("cli"):
                flags.setdefault(f.metadata.get("flag") or f.name.replace("_", "-"), []).append((name, f))
    return flags


def _flag_help(entries) -> str:
    parts = []
    for method, f in entries:
        choices = f.metadata.get("choices")
        what = f.metadata["help"] + (f" ({', '.join(choices)})" if choices else "")
        parts.append(f"{method}: {what} (default {f.default})")
    return "; ".join(parts)


def _flag_type(entries):
    from ..methods import config_class

    kinds = {typing.get_type_hints(config_class(m))[f.name] for m, f in entries}
    return float if kinds & {float} else int if kinds & {int} else str


def _add_sampling_args(p: argparse.ArgumentParser, conditioning: bool = True) -> None:
    p.add_argument("--steps", type=_positive, default=None, help="sampling steps (default 20, or those a quantized "
                   "model was calibrated for)")
    p.add_argument("--scheduler", default=None, help="ddim, ddpm, pndm (plms), dpm++ or flow-euler (default: the "
                   "one a quantized model was calibrated for, else flow-euler for a flow-matching model, else ddim)")
    if conditioning:  # evaluation always uses the model's own guidance and balanced labels
        p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: the "
                       "model's)")
        p.add_argument("--labels", type=_labels, default=None, help="class labels, comma-separated (default: balanced)")
        p.add_argument("--prompt", action="append", default=None, help="prompt for text-conditioned models "
                       "(repeatable; default: the model's own prompts, if it has them)")
        p.add_argument("--prompt-file", default=None, help="a text file of prompts, one per line (with --prompt: "
                       "both)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--batch-size", type=_positive, default=None, help="samples per forward pass (default 32); "
                   "accuquant: trajectories per optimisation step (default 8)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _bundled_help() -> str:
    from ..bundled import MODELS

    return f"a bundled model ({MODELS[0]}, the default; {'; '.join(MODELS[1:])})"


def build_parser() -> argparse.ArgumentParser:
    bundled_help = _bundled_help()
    parser = _Parser(prog="accuquant", description="Post-training quantization of diffusion models.")
    parser.add_argument("--version", action="version", version=f"accuquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a diffusers model and save it")
    q.add_argument("--model", default=None, help="diffusers pipeline or model directory, hub id, or "
                   + bundled_help)
    from ..methods import METHODS

    q.add_argument("--method", default="accuquant", help=f"calibration method: {', '.join(METHODS)} "
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
    learn = q.add_argument_group("method options (generated from each method's config)")
    for flag, entries in method_flags().items():
        if flag != "batch-size":  # --batch-size is every command's pass size, and accuquant's batch
            learn.add_argument("--" + flag, dest=flag.replace("-", "_"), type=_flag_type(entries), default=None,
                               help=_flag_help(entries))
    learn.add_argument("--resume", action="store_true", help="continue an interrupted calibration with the same "
                       "settings from its last checkpoint")
    learn.add_argument("--micro-batches", type=_positive, default=1, help="passes per optimisation batch (gradient "
                       "accumulation: less memory; default 1). Data-parallel: torchrun --nproc-per-node N -m "
                       "accuquant quantize ...")
    learn.add_argument("--max-memory", type=_size, default="2GB", help="RAM for the block data per-step captures "
                       "(e.g. 4GB, 512MB; default 2GB); the rest goes to temporary files, with the same result")
    _add_sampling_args(q)

    backend_help = "what runs a quantized model's layers (default fake: the calibrated float arithmetic)"
    s = sub.add_parser("sample", help="sample a grid of images from a (quantized) model")
    s.add_argument("--model", default=None, help="accuquant output directory, a diffusers model, or "
                   + bundled_help)
    s.add_argument("--num", type=_positive, default=16, help="number of samples (default 16)")
    s.add_argument("--nrow", type=_positive, default=None, help="images per grid row")
    s.add_argument("--out", required=True, help="output PNG file")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    s.add_argument("--backend", default="fake", help=backend_help)
    _add_sampling_args(s)
    e = sub.add_parser("evaluate", help="paired metrics of a quantized model against its FP base")
    e.add_argument("--model", default=None, help="accuquant output directory, an FP model, or "
                   + bundled_help)
    e.add_argument("--base", default=None, help="the FP base model (default: the one recorded at quantization)")
    e.add_argument("--num", type=_positive, default=1000, help="paired samples (default 1000)")
    e.add_argument("--features", default="auto", help="feature network: auto, digits or inception")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--lpips", action="store_true", help="also LPIPS (needs the lpips package and its weights)")
    e.add_argument("--no-cache", action="store_true", help="do not reuse or cache FP samples")
    e.add_argument("--backend", default="fake", help=backend_help)
    _add_sampling_args(e, conditioning=False)

    a = sub.add_parser("analyze", help="error accumulation per sampling step (CSV and plot)")
    a.add_argument("--model", required=True, help="accuquant output directory")
    a.add_argument("--base", default=None, help="the FP base model (default: the one recorded at quantization)")
    a.add_argument("--num", type=_positive, default=500, help="paired trajectories (default 500)")
    a.add_argument("--features", default="auto", help="feature network for FID2FP of x0: auto, digits or inception")
    a.add_argument("--out", required=True, help="output prefix: writes PREFIX.csv and PREFIX.png")
    a.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_sampling_args(a, conditioning=False)

    x = sub.add_parser("export", help="write a quantized model as a plain diffusers directory (torchao int8 "
                       "weights) that loads without accuquant")
    x.add_argument("--model", required=True, help="accuquant output directory (quantized layers all Linear: DiT, SD3)")
    x.add_argument("--out", required=True, help="output directory")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    sp = sub.add_parser("speed", help="latency of a quantized model on each backend against its FP base (fp32, "
                        "bf16 autocast)")
    sp.add_argument("--model", required=True, help="accuquant output directory")
    sp.add_argument("--base", default=None, help="the FP base model (default: the one recorded at quantization)")
    sp.add_argument("--backend", default="fake,int8", help="backends to time, comma-separated (default fake,int8)")
    sp.add_argument("--batch", type=_positive, default=2, help="samples per call (default 2; guided models run "
                    "twice the rows)")
    sp.add_argument("--steps", type=_positive, default=20, help="steps of the timed whole sample (default 20)")
    sp.add_argument("--repeats", type=_positive, default=5, help="timed repeats; medians are reported (default 5)")
    sp.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    sp.add_argument("--device", default="cpu", help="where the models run (default cpu; cuda: time cuda-int8 "
                    "against float32, bf16 and fp16 autocast)")
    sp.add_argument("--json", action="store_true", help="print one JSON object")

    c = sub.add_parser("compare", help="quantize with several methods and bit widths and write one report")
    c.add_argument("--model", default=None, help="diffusers pipeline or model directory, or "
                   + bundled_help)
    c.add_argument("--methods", default="naive,per-step,accuquant", help="comma-separated methods (default "
                   "naive,per-step,accuquant)")
    c.add_argument("--bits", default="w8a8,w4a8,w3a8,w4a6", help="comma-separated bit widths w<W>a<A> (default "
                   "w8a8,w4a8,w3a8,w4a6)")
    c.add_argument("--num", type=_positive, default=1000, help="paired samples per evaluation (default 1000)")
    c.add_argument("--analyze-num", type=_positive, default=256, help="paired samples for the error curves "
                   "(default 256)")
    c.add_argument("--grid", type=_positive, default=10, help="samples per row of the sample grids (default 10)")
    c.add_argument("--steps", type=_positive, default=20, help="sampling steps (default 20)")
    c.add_argument("--scheduler", default=None, help="ddim, ddpm, pndm (plms), dpm++ or flow-euler (default: "
                   "flow-euler for a flow-matching model, else ddim)")
    c.add_argument("--calib-samples", type=_positive, default=64, help="calibration trajectories (default 64)")
    c.add_argument("--seed", type=int, default=0, help="calibration and noise seed (default 0)")
    c.add_argument("--out", default="runs/compare", help="output directory (default runs/compare); a rerun with "
                   "the same settings skips the pairs already done")
    c.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    c.add_argument("--backend", default="fake", help="what runs the quantized models' layers while they are scored "
                   "(default fake; int8: the CPU's integer kernels)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _compare(args) -> None:
    from ..bundled import model_ref
    from ..eval.compare import CompareSettings, run_compare

    from ..eval.report import markdown_table

    _check_scheduler(args.scheduler)
    check_device(args.device)
    model = _model_arg(args)
    settings = CompareSettings(
        model=model_ref(model) if Path(model).exists() else model,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        bits=[b.strip().lower() for b in args.bits.split(",") if b.strip()],
        num=args.num, steps=args.steps, scheduler=args.scheduler, calib_samples=args.calib_samples, seed=args.seed,
        analyze_num=args.analyze_num, grid=args.grid, device=args.device, backend=args.backend)
    results = run_compare(settings, args.out, quiet=args.quiet)
    print(markdown_table(results))
    print(f"wrote {Path(args.out) / 'report.md'}, report.html and results.json ({results['wall_s']:.0f} s)")


def _model_arg(args) -> str:
    from ..bundled import DEFAULT_MODEL, resolve_ref

    return resolve_ref(args.model) if args.model is not None else str(DEFAULT_MODEL)


def _prompts(args) -> list[str] | None:
    """``--prompt`` values, then the lines of ``--prompt-file`` (blank lines skipped)."""
    prompts = list(args.prompt or [])
    if args.prompt_file is not None:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise AccuQuantError(f"{args.prompt_file}: cannot read the prompt file ({type(e).__name__})") from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise AccuQuantError(f"{args.prompt_file}: no prompts in the file")
        prompts += lines
    return prompts or None


def _check_scheduler(name: str | None) -> None:
    from ..sampling import solver_class

    if name is not None:
        solver_class(name)


def _evaluate(args) -> None:
    import json

    from ..backends import get_backend
    from ..eval.evaluation import evaluate, format_table, to_json_safe
    from ..io.load import load_pipeline

    check_device(args.device)
    _check_scheduler(args.scheduler)
    get_backend(args.backend)
    model = load_pipeline(_model_arg(args), device=args.device, backend=args.backend)
    if not args.json:
        _print_placement(model, args.backend)
    r = evaluate(model, args.base, num=args.num, steps=args.steps, seed=args.seed, scheduler=args.scheduler,
                 features=args.features, batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                 use_cache=not args.no_cache, lpips=args.lpips)
    print(json.dumps(to_json_safe(r)) if args.json else format_table(r))


def _analyze(args) -> None:
    from ..eval.analysis import error_accumulation, plot, write_csv
    from ..io.load import load_pipeline

    check_device(args.device)
    _check_scheduler(args.scheduler)
    csv_path, png_path = Path(args.out + ".csv"), Path(args.out + ".png")
    for p in (csv_path, png_path):
        if p.exists() and not args.overwrite:
            raise AccuQuantError(f"{p}: exists (pass --overwrite to replace it)")
        check_writable(p)
    model = load_pipeline(args.model, device=args.device)
    rows = error_accumulation(model, args.base, num=args.num, steps=args.steps, seed=args.seed,
                              scheduler=args.scheduler, features=args.features, batch_size=args.batch_size,
                              device=args.device, progress=not args.quiet)
    label = model.quant.label if model.quant else "fp"
    plot({label: rows}, png_path, title=f"{label}: {args.num} paired trajectories")
    write_csv(rows, csv_path)
    last = rows[-1]
    print(f"wrote {csv_path} and {png_path}; last step: step error {last['step_error']:.4f}, "
          f"accumulated error {last['accumulated_error']:.4f}")


def _method_options(args) -> dict:
    """The method options given on the command line, by config field; a flag the method
    does not take is refused naming the ones it does."""
    flags = method_flags()
    takes = {flag: f.name for flag, entries in flags.items() for m, f in entries if m == args.method}
    given = {flag: getattr(args, flag.replace("-", "_"), None) for flag in flags}
    given["batch-size"] = args.batch_size_given
    wrong = sorted(flag for flag, v in given.items() if v is not None and flag not in takes and flag != "batch-size")
    if wrong:
        listed = ", ".join("--" + f for f in takes)
        raise AccuQuantError(f"{', '.join('--' + f for f in wrong)}: not an option of the {args.method} method"
                             + (f" (it takes {listed})" if takes else "; it learns nothing"))
    return {takes[flag]: v for flag, v in given.items() if v is not None and flag in takes}


def _quantize(args) -> None:
    from ..api import quantize
    from ..config import QuantConfig
    from ..methods import method_config
    from ..io.files import check_out_dir

    check_device(args.device)
    args.steps = args.steps or 20
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
    mconfig = method_config(args.method, _method_options(args))  # validated before any work
    _check_scheduler(args.scheduler)
    model_path = _model_arg(args)
    from ..bundled import is_bundled

    bundled = is_bundled(model_path)
    bits = f"w{cfg.weight_bits or 'fp'}a{cfg.act_bits or 'fp'}"
    out = Path(args.out) if args.out else Path("runs") / f"{Path(model_path).name}-{args.method}-{bits}"
    check_out_dir(out, args.overwrite)  # refuse before the long work, not after
    from ..calibrate import distributed

    if distributed.init_from_env(args.device):  # under torchrun: data-parallel, rank 0 writes and reports
        import torch.distributed as dist

        try:  # the other ranks leave once calibrated; a rank that fails ends, and torchrun stops the rest
            _quantize_in(args, model_path, cfg, mconfig, out, bundled, main=distributed.is_main())
        finally:
            dist.destroy_process_group()
        return
    _quantize_in(args, model_path, cfg, mconfig, out, bundled)


def _quantize_in(args, model_path, cfg, mconfig, out: Path, bundled: bool, main: bool = True) -> None:
    from ..api import quantize

    summary = args.summary if args.summary is not None else (300 if bundled else 0)
    t0 = time.perf_counter()
    common = dict(steps=args.steps, scheduler=args.scheduler, calib_samples=args.calib_samples, seed=args.seed,
                  guidance_scale=args.guidance_scale, labels=args.labels, prompts=_prompts(args),
                  batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                  use_cache=not args.no_cache)
    pipe = quantize(model_path, cfg, mconfig, args.calib, inplace=True, resume=args.resume,
                    micro_batches=args.micro_batches, max_memory=args.max_memory, **common)
    if not main:
        return
    pipe.save(out, overwrite=args.overwrite)
    report = pipe.quant.report
    wfile = out / pipe.denoiser_name / "accuquant_weights.safetensors"
    print(f"quantized {pipe.denoiser_name} with {args.method} at W{cfg.weight_bits or 'fp'}A{cfg.act_bits or 'fp'}: "
          f"{len(report.quantized)} layers ({len(report.split)} shortcut-split), "
          f"{len(report.attention)} attention blocks; kept in full precision: {', '.join(report.kept_fp) or 'none'}")
    print(f"saved {out} (weights {os.path.getsize(wfile) / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s")
    if pipe.quant.method_log.get("cached"):
        print("the calibration came from the cache: this method with its defaults had run on this model, bits, "
              "data and seed before (--no-cache runs it again)")
    if summary:
        _summary(pipe, model_path, cfg, args, common, summary)


def _summary(pipe, model_path: str, cfg, args, common: dict, num: int) -> None:
    """Paired quality against FP, next to the naive method's at the same bits."""
    from ..api import quantize
    from ..eval.evaluation import evaluate
    from ..io.load import load_pipeline

    if pipe.denoiser(1.0).conditioning == "text" and not pipe.defaults.prompts:
        print("no quality summary: the evaluation samples from a text model's own default prompts, and it has none")
        return
    fp = load_pipeline(model_path, device=args.device)
    ev = dict(num=num, steps=args.steps, seed=args.seed, scheduler=args.scheduler, batch_size=args.batch_size,
              device=args.device, progress=not args.quiet)
    rows = {args.method: evaluate(pipe, fp, **ev)}
    if args.method != "naive":
        naive = quantize(fp, cfg, "naive", args.calib, **{**common, "progress": False})
        rows["naive"] = evaluate(naive, fp, **ev)
    steps, solver = pipe.sampling_settings(args.steps, args.scheduler)
    print(f"quality against FP on {num} paired samples ({steps} {solver} steps, seed {args.seed}):")
    for name, r in rows.items():
        print(f"  {name:>10}: fid2fp {r['fid2fp']:8.3f}  psnr {r['psnr']:6.2f} dB  ssim {r['ssim']:.4f}")


def _sample(args) -> None:
    from ..backends import get_backend
    from ..eval.images import save_grid
    from ..io.load import load_pipeline

    check_device(args.device)
    _check_scheduler(args.scheduler)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise AccuQuantError(f"{out}: exists (pass --overwrite to replace it)")
    if out.suffix.lower() != ".png":
        raise AccuQuantError(f"{out}: the grid is written as PNG; use a .png name")
    check_writable(out)
    get_backend(args.backend)  # an unknown backend is refused before the model loads
    prompts = _prompts(args)  # a bad prompt file is refused before the model loads
    pipe = load_pipeline(_model_arg(args), device=args.device, backend=args.backend)
    _print_placement(pipe, args.backend)
    args.steps, args.scheduler = pipe.sampling_settings(args.steps, args.scheduler)
    x = pipe.sample(args.num, seed=args.seed, steps=args.steps, scheduler=args.scheduler, labels=args.labels,
                    prompts=prompts, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                    device=args.device, progress=not args.quiet)
    save_grid(pipe.decode(x.to(args.device)), out, args.nrow)
    print(f"wrote {out} ({args.num} samples, {args.steps} {args.scheduler} steps)")


def _export(args) -> None:
    from ..io.load import load_pipeline
    from ..io.files import check_out_dir
    from ..io.torchao import save_torchao

    out = Path(args.out)
    check_out_dir(out, args.overwrite)
    pipe = load_pipeline(args.model)
    save_torchao(pipe, out, overwrite=args.overwrite)
    print(f"wrote {out}: load it with {pipe.to_diffusers().__class__.__name__}.from_pretrained"
          f"('{out}', torch_dtype=torch.float32) (diffusers and torchao)")


def _speed(args) -> None:
    import json

    from ..backends import get_backend
    from ..eval.speed import format_speed, measure

    check_device(args.device)
    backends = [b for b in args.backend.split(",") if b]
    for b in backends:
        get_backend(b)
    r = measure(_model_arg(args), backends, batch=args.batch, steps=args.steps, repeats=args.repeats,
                threads=args.threads, base=args.base, device=args.device)
    print(json.dumps(r) if args.json else format_speed(r))


def _print_placement(pipe, backend: str) -> None:
    """Which backend runs the quantized layers, when one other than ``fake`` was asked for."""
    from ..quant.layers import placement

    if backend == "fake" or not pipe.quant:
        return
    where = placement(pipe.model)
    on, off = where.get(backend, []), [n for k, v in where.items() if k != backend for n in v]
    print(f"backend {backend}: {len(on)} layers on its kernels, {len(off)} on fake"
          + (f" (first: {off[0]})" if off else ""))


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    args.batch_size_given = getattr(args, "batch_size", None)
    args.batch_size = args.batch_size_given or 32
    _quiet_libraries()
    try:
        {"quantize": _quantize, "sample": _sample, "evaluate": _evaluate, "analyze": _analyze,
         "compare": _compare, "speed": _speed, "export": _export}[args.command](args)
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
    except OSError as e:  # a full disk, a permission, a file that vanished: nothing was written
        what = f"{e.filename}: {e.strerror}" if e.filename else e.strerror if e.errno and e.strerror else e
        print(f"accuquant: error: {what}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _quiet_libraries() -> None:
    """diffusers and transformers print their own loading bars and notes on stderr; the
    command line's stderr is its progress bars and, on failure, one line."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when they are imported
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("diffusers", "transformers"):  # already imported (the command line called from Python)
        lib = sys.modules.get(name)
        if lib is not None:
            lib.utils.logging.disable_progress_bar()
            lib.utils.logging.set_verbosity_error()
    # torchao, which diffusers imports when it is installed (the export extra): notes on
    # compiled kernels a CPU build lacks, and torch's on the types it registers
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
