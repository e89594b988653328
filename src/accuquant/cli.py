"""The ``accuquant`` command line: ``quantize`` and ``sample``.

Every problem with the input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import AccuQuantError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"accuquant: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


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


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AccuQuantError("--device cuda: no CUDA device is available")
    if not (device == "cpu" or device.startswith("cuda")):
        raise AccuQuantError(f"--device: expected cpu or cuda, got {device!r}")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=_positive, default=None, help="sampling steps (default 20, or those a quantized "
                   "model was calibrated for)")
    p.add_argument("--scheduler", default=None, help="ddim, ddpm, pndm (plms) or dpm++ (default ddim, or the one "
                   "a quantized model was calibrated for)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: the model's)")
    p.add_argument("--labels", type=_labels, default=None, help="class labels, comma-separated (default: balanced)")
    p.add_argument("--prompt", action="append", default=None, help="prompt for text-conditioned models (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--batch-size", type=_positive, default=32, help="samples per forward pass (default 32)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="accuquant", description="Post-training quantization of diffusion models.")
    parser.add_argument("--version", action="version", version=f"accuquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a diffusers model and save it")
    q.add_argument("--model", required=True, help="diffusers pipeline or model directory, or hub id")
    q.add_argument("--method", default="naive", help="calibration method (default naive)")
    q.add_argument("--weight-bits", type=_bits, default=8, help="2..8, or none (default 8)")
    q.add_argument("--act-bits", type=_bits, default=8, help="2..8, or none (default 8)")
    q.add_argument("--attn-bits", type=_bits, default=None, help="bits of attention matmul inputs (default: act bits)")
    q.add_argument("--softmax-bits", type=_bits, default=None, help="bits of the softmax output (default: act bits)")
    q.add_argument("--weight-symmetric", action="store_true", help="symmetric weight grid (default affine)")
    q.add_argument("--keep-fp", action="append", default=None, help="module-name pattern kept in full precision "
                   "(repeatable; replaces the default conv_in/conv_out)")
    q.add_argument("--no-split-shortcut", action="store_true", help="do not split concatenated shortcut inputs")
    q.add_argument("--calib-samples", type=_positive, default=64, help="calibration trajectories (default 64)")
    q.add_argument("--calib", default=None, help="saved calibration trajectories (safetensors) to reuse")
    q.add_argument("--no-cache", action="store_true", help="do not reuse or cache calibration trajectories")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    _add_sampling_args(q)

    s = sub.add_parser("sample", help="sample a grid of images from a (quantized) model")
    s.add_argument("--model", required=True, help="accuquant output directory, or a diffusers model")
    s.add_argument("--num", type=_positive, default=16, help="number of samples (default 16)")
    s.add_argument("--nrow", type=_positive, default=None, help="images per grid row")
    s.add_argument("--out", required=True, help="output PNG file")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _add_sampling_args(s)
    return parser


def _quantize(args) -> None:
    from .config import QuantConfig
    from .engine import quantize
    from .methods import get_method
    from .safety import check_out_dir

    _check_device(args.device)
    args.steps = args.steps or 20
    args.scheduler = args.scheduler or "ddim"
    kw = {}
    if args.keep_fp is not None:
        kw["keep_fp"] = tuple(args.keep_fp)
    cfg = QuantConfig(
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
        attn_bits="act" if args.attn_bits is None else args.attn_bits,
        softmax_bits="act" if args.softmax_bits is None else args.softmax_bits,
        weight_symmetric=args.weight_symmetric,
        split_shortcut=not args.no_split_shortcut,
        **kw,
    )
    get_method(args.method)
    from .sampling import SOLVERS

    if args.scheduler.lower() not in SOLVERS:
        raise AccuQuantError(f"unknown scheduler {args.scheduler!r}; choose one of: {', '.join(SOLVERS)}")
    out = Path(args.out)
    check_out_dir(out, args.overwrite)  # refuse before the long work, not after
    t0 = time.perf_counter()
    pipe = quantize(
        args.model, cfg, args.method, args.calib, steps=args.steps, scheduler=args.scheduler,
        calib_samples=args.calib_samples, seed=args.seed, guidance_scale=args.guidance_scale, labels=args.labels,
        prompts=args.prompt, batch_size=args.batch_size, device=args.device, progress=not args.quiet,
        inplace=True, use_cache=not args.no_cache,
    )
    pipe.save(out, overwrite=args.overwrite)
    report = pipe.quant["report"]
    wfile = out / pipe.denoiser_name / "accuquant_weights.safetensors"
    print(f"quantized {pipe.denoiser_name} with {args.method} at W{cfg.weight_bits or 'fp'}A{cfg.act_bits or 'fp'}: "
          f"{len(report['quantized'])} layers ({len(report['split'])} shortcut-split), "
          f"{len(report['attention'])} attention blocks; kept in full precision: {', '.join(report['kept_fp']) or 'none'}")
    print(f"saved {out} (weights {os.path.getsize(wfile) / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s")


def _sample(args) -> None:
    from .images import save_grid
    from .pipeline import load_pipeline
    from .sampling import SOLVERS

    _check_device(args.device)
    if args.scheduler is not None and args.scheduler.lower() not in SOLVERS:
        raise AccuQuantError(f"unknown scheduler {args.scheduler!r}; choose one of: {', '.join(SOLVERS)}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise AccuQuantError(f"{out}: exists (pass --overwrite to replace it)")
    if out.suffix.lower() != ".png":
        raise AccuQuantError(f"{out}: the grid is written as PNG; use a .png name")
    pipe = load_pipeline(args.model, device=args.device)
    calibrated = (pipe.quant or {}).get("calibration", {})
    args.steps = args.steps or calibrated.get("steps", 20)
    args.scheduler = args.scheduler or calibrated.get("solver", "ddim")
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
    try:
        {"quantize": _quantize, "sample": _sample}[args.command](args)
    except AccuQuantError as e:
        print(f"accuquant: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("accuquant: interrupted; nothing was written", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"accuquant: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
