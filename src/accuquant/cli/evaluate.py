"""``accuquant evaluate``: paired metrics of a quantized model against its FP base."""

from __future__ import annotations

from ..errors import check_device
from . import options as o
from .sample import BACKEND_HELP


def add_parser(sub) -> None:
    e = sub.add_parser("evaluate", help="paired metrics of a quantized model against its FP base")
    e.add_argument("--model", default=None, help="accuquant output directory, an FP model, or " + o.bundled_help())
    e.add_argument("--base", default=None, help="the FP base model (default: the one recorded at quantization)")
    e.add_argument("--num", type=o.positive, default=1000, help="paired samples (default 1000)")
    e.add_argument("--features", default="auto", help="feature network: auto, digits or inception")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--lpips", action="store_true", help="also LPIPS (needs the lpips package and its weights)")
    e.add_argument("--no-cache", action="store_true", help="do not reuse or cache FP samples")
    e.add_argument("--backend", default="fake", help=BACKEND_HELP)
    o.add_lora_args(e, "the model and its FP base alike (metrics to FP + LoRA)")
    o.add_sampling_args(e, conditioning=False)


def run(args) -> None:
    import json

    from ..backends import check_backend
    from ..bundled import resolve_ref
    from ..eval.evaluation import base_of, evaluate, format_table, to_json_safe
    from ..io.load import load_pipeline

    check_device(args.device)
    o.check_scheduler(args.scheduler)
    check_backend(args.backend, args.device)
    prompts = o.prompts(args)  # a bad prompt file is refused before the model loads
    o.check_images("evaluate (image metrics)", o.model_arg(args), resolve_ref(args.base) if args.base else None)
    model = load_pipeline(o.model_arg(args), device=args.device, backend=args.backend)
    if not args.json:
        o.print_placement(model, args.backend)
    base = args.base
    if args.lora:  # the reference is the FP base with the same LoRA
        base = base_of(model, args.base)
        o.apply_lora(args, model, base)
    r = evaluate(model, base, num=args.num, steps=args.steps, seed=args.seed, scheduler=args.scheduler,
                 features=args.features, batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                 use_cache=not args.no_cache, lpips=args.lpips, prompts=prompts)
    print(json.dumps(to_json_safe(r)) if args.json else format_table(r))
