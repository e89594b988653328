"""``accuquant speed``: latency of a quantized model on each backend against its FP base."""

from __future__ import annotations

from ..config import DEFAULT_STEPS
from ..errors import check_device
from . import options as o


def add_parser(sub) -> None:
    sp = sub.add_parser("speed", help="latency of a quantized model on each backend against its FP base (fp32, "
                        "bf16 autocast)")
    sp.add_argument("--model", required=True, help="accuquant output directory")
    sp.add_argument("--base", default=None, help="the FP base model (default: the one recorded at quantization)")
    sp.add_argument("--backend", default=None, help="backends to time, comma-separated (default: every backend "
                    "that can run on this machine and device)")
    sp.add_argument("--batch", type=o.positive, default=2, help="samples per call (default 2; guided models run "
                    "twice the rows)")
    sp.add_argument("--steps", type=o.positive, default=DEFAULT_STEPS, help="steps of the timed whole sample "
                    f"(default {DEFAULT_STEPS})")
    sp.add_argument("--repeats", type=o.positive, default=5, help="timed repeats; medians are reported (default 5)")
    sp.add_argument("--threads", type=o.positive, default=None, help="torch threads (default: torch's)")
    sp.add_argument("--device", default="cpu", help="where the models run (default cpu; cuda: time cuda-int8 "
                    "against float32, bf16 and fp16 autocast)")
    sp.add_argument("--compile", action="store_true", help="also time each backend and float32 compiled by "
                    "torch.compile (Inductor; the compile time is reported apart)")
    sp.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> None:
    import json

    from ..backends import backends_for, check_backend
    from ..eval.speed import COMPILE, format_speed, measure

    check_device(args.device)
    backends = backends_for(args.device) if args.backend is None else [b for b in args.backend.split(",") if b]
    for b in backends:
        check_backend(b, args.device)
    if args.compile:
        backends += [b + COMPILE for b in backends]
    r = measure(o.model_arg(args), backends, batch=args.batch, steps=args.steps, repeats=args.repeats,
                threads=args.threads, base=args.base, device=args.device)
    print(json.dumps(r) if args.json else format_speed(r))
