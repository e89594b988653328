"""``accuquant compare``: several methods and bit widths on one model, and one report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import parse_bits_label
from ..errors import AccuQuantError, check_device
from . import options as o


def add_parser(sub) -> None:
    from ..eval.compare import DEFAULT_BITS, DEFAULT_METHODS, CompareSettings

    d = {f.name: f.default for f in dataclasses.fields(CompareSettings) if f.default is not dataclasses.MISSING}
    methods, bits = ",".join(DEFAULT_METHODS), ",".join(DEFAULT_BITS)
    c = sub.add_parser("compare", help="quantize with several methods and bit widths and write one report")
    c.add_argument("--model", default=None, help="diffusers pipeline or model directory, or " + o.bundled_help())
    c.add_argument("--methods", default=methods, help=f"comma-separated methods (default {methods})")
    c.add_argument("--bits", default=bits, help=f"comma-separated bit widths w<W>a<A> (default {bits})")
    c.add_argument("--num", type=o.positive, default=d["num"], help=f"paired samples per evaluation (default "
                   f"{d['num']})")
    c.add_argument("--analyze-num", type=o.positive, default=d["analyze_num"], help="paired samples for the error "
                   f"curves (default {d['analyze_num']})")
    c.add_argument("--grid", type=o.positive, default=d["grid"], help="samples per row of the sample grids "
                   f"(default {d['grid']})")
    c.add_argument("--steps", type=o.positive, default=d["steps"], help=f"sampling steps (default {d['steps']})")
    c.add_argument("--scheduler", default=None, help="ddim, ddpm, pndm (plms), dpm++ or flow-euler (default: "
                   "flow-euler for a flow-matching model, else ddim)")
    c.add_argument("--calib-samples", type=o.positive, default=d["calib_samples"], help="calibration trajectories "
                   f"(default {d['calib_samples']})")
    c.add_argument("--seed", type=int, default=d["seed"], help=f"calibration and noise seed (default {d['seed']})")
    o.add_prompt_args(c)
    c.add_argument("--out", default="runs/compare", help="output directory (default runs/compare; not the model's "
                   "own, nor one inside it or holding it); a rerun with the same settings skips the pairs already "
                   "done")
    c.add_argument("--device", default=d["device"], help=f"{d['device']} (default) or cuda")
    c.add_argument("--backend", default=d["backend"], help="what runs the quantized models' layers while they are "
                   f"scored (default {d['backend']}; int8: the CPU's integer kernels)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    quant = c.add_argument_group("quantization options of every pair (generated from QuantConfig; widths: --bits)")
    o.add_quant_flags(quant, skip=("weight_bits", "act_bits"))


def interrupt_hint(args) -> str:
    return (" for the pair in progress (rerun the same command: finished pairs are kept, and an interrupted "
            "calibration continues from its checkpoint)")


def run(args) -> None:
    from ..bundled import model_ref
    from ..eval.compare import CompareSettings, run_compare
    from ..eval.report import markdown_table

    o.check_scheduler(args.scheduler)
    check_device(args.device)
    bits = [b.strip().lower() for b in args.bits.split(",") if b.strip()]
    for b in bits:
        try:
            parse_bits_label(b)
        except AccuQuantError as e:
            raise AccuQuantError(f"--bits: {e}") from None
    model = o.model_arg(args)
    o.check_images("compare (image metrics and grids)", model)
    settings = CompareSettings(
        model=model_ref(model) if Path(model).exists() else model,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        bits=bits,
        num=args.num, steps=args.steps, scheduler=args.scheduler, calib_samples=args.calib_samples, seed=args.seed,
        analyze_num=args.analyze_num, grid=args.grid, device=args.device, backend=args.backend,
        prompts=o.prompts(args), quant=o.given(args, [f for f in o.quant_flags() if f not in ("weight-bits",
                                                                                            "act-bits")]) or None)
    results = run_compare(settings, args.out, quiet=args.quiet)  # checks everything before any work
    print(markdown_table(results))
    print(f"wrote {Path(args.out) / 'report.md'}, report.html and results.json ({results['wall_s']:.0f} s)")
