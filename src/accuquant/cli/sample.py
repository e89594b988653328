"""``accuquant sample``: a grid of images from a (quantized) model."""

from __future__ import annotations

from pathlib import Path

from ..errors import AccuQuantError, check_device
from . import options as o

#: what ``--backend`` means, for every command that runs a quantized model
BACKEND_HELP = "what runs a quantized model's layers (default fake: the calibrated float arithmetic)"


def add_parser(sub) -> None:
    s = sub.add_parser("sample", help="sample a grid of images from a (quantized) model")
    s.add_argument("--model", default=None, help="accuquant output directory, a diffusers model, or "
                   + o.bundled_help())
    s.add_argument("--num", type=o.positive, default=16, help="number of samples (default 16)")
    s.add_argument("--nrow", type=o.positive, default=None, help="images per grid row")
    s.add_argument("--out", required=True, help="output PNG file (not inside the model's directory)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    s.add_argument("--backend", default="fake", help=BACKEND_HELP)
    o.add_lora_args(s, "the model")
    o.add_sampling_args(s)


def run(args) -> None:
    from ..backends import check_backend
    from ..eval.images import save_grid
    from ..io.load import load_pipeline

    check_device(args.device)
    o.check_scheduler(args.scheduler)
    out = Path(args.out)
    model = o.model_arg(args)
    o.check_output_file(out, args.overwrite, model)
    if out.suffix.lower() != ".png":
        raise AccuQuantError(f"{out}: the grid is written as PNG; use a .png name")
    o.check_images("sample (an image grid)", model)
    check_backend(args.backend, args.device)  # refused before the model loads
    prompts = o.prompts(args)  # a bad prompt file is refused before the model loads
    pipe = load_pipeline(model, device=args.device, backend=args.backend)
    o.print_placement(pipe, args.backend)
    o.apply_lora(args, pipe)
    args.steps, args.scheduler = pipe.sampling_settings(args.steps, args.scheduler)
    x = pipe.sample(args.num, seed=args.seed, steps=args.steps, scheduler=args.scheduler, labels=args.labels,
                    prompts=prompts, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                    device=args.device, progress=not args.quiet)
    save_grid(pipe.decode(x.to(args.device)), out, args.nrow)
    print(f"wrote {out} ({args.num} samples, {args.steps} {args.scheduler} steps)")
