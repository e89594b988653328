"""``accuquant analyze``: error accumulation per sampling step (CSV and plot)."""

from __future__ import annotations

from pathlib import Path

from ..errors import check_device
from . import options as o


def add_parser(sub) -> None:
    a = sub.add_parser("analyze", help="error accumulation per sampling step (CSV and plot)")
    a.add_argument("--model", required=True, help="accuquant output directory")
    a.add_argument("--base", default=None, help="the FP base model (default: the one recorded at quantization)")
    a.add_argument("--num", type=o.positive, default=500, help="paired trajectories (default 500)")
    a.add_argument("--features", default="auto", help="feature network for FID2FP of x0: auto, digits or inception")
    a.add_argument("--out", required=True, help="output prefix: writes PREFIX.csv and PREFIX.png (not inside a "
                   "model's directory)")
    a.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    o.add_sampling_args(a, conditioning=False)


def run(args) -> None:
    from ..bundled import resolve_ref
    from ..eval.analysis import error_accumulation, plot, write_csv
    from ..io.files import check_not_inside
    from ..io.load import load_pipeline

    check_device(args.device)
    o.check_scheduler(args.scheduler)
    csv_path, png_path = Path(args.out + ".csv"), Path(args.out + ".png")
    model_path = resolve_ref(args.model)
    for p in (csv_path, png_path):
        o.check_output_file(p, args.overwrite, model_path, args.base)
    o.check_images("analyze (the FID of predicted images)", model_path, resolve_ref(args.base) if args.base else None)
    prompts = o.prompts(args)  # a bad prompt file is refused before the model loads
    model = load_pipeline(model_path, device=args.device)
    if args.base is None and model.quant is not None and model.quant.base_model:
        for p in (csv_path, png_path):  # the recorded base, known once the model is read
            check_not_inside(p, model.quant.base_model)
    rows = error_accumulation(model, args.base, num=args.num, steps=args.steps, seed=args.seed,
                              scheduler=args.scheduler, features=args.features, batch_size=args.batch_size,
                              device=args.device, progress=not args.quiet, prompts=prompts)
    label = model.quant.label if model.quant else "fp"
    plot({label: rows}, png_path, title=f"{label}: {args.num} paired trajectories")
    write_csv(rows, csv_path)
    last = rows[-1]
    print(f"wrote {csv_path} and {png_path}; last step: step error {last['step_error']:.4f}, "
          f"accumulated error {last['accumulated_error']:.4f}")
