"""The ``accuquant`` command line: ``quantize``, ``sample``, ``evaluate``, ``analyze``, ``compare``, ``speed``,
``export`` and ``models``, one module each (``add_parser(sub)`` and ``run(args)``; shared arguments and the
flags generated from the option system in :mod:`accuquant.cli.options`).

Every problem with the input, and every failed write (a full disk, a permission), ends with
one line on stderr and exit status 2, and leaves nothing half-written; an interrupt exits
with status 130.
"""

from __future__ import annotations

import os
import sys

from ..config import DEFAULT_BATCH_SIZE
from ..errors import AccuQuantError
from ..version import __version__
from . import analyze, compare, evaluate, export, models, quantize, sample, speed
from .options import EXIT_USAGE, Parser, method_flags

__all__ = ["EXIT_USAGE", "build_parser", "main", "method_flags"]

#: command name -> its module, in the order ``accuquant --help`` lists them
COMMANDS = {"quantize": quantize, "sample": sample, "evaluate": evaluate, "analyze": analyze, "export": export,
            "speed": speed, "compare": compare, "models": models}


def build_parser() -> Parser:
    parser = Parser(prog="accuquant", description="Post-training quantization of diffusion models.")
    parser.add_argument("--version", action="version", version=f"accuquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    args.batch_size_given = getattr(args, "batch_size", None)
    args.batch_size = args.batch_size_given or DEFAULT_BATCH_SIZE
    _quiet_libraries()
    command = COMMANDS[args.command]
    try:
        command.run(args)
    except AccuQuantError as e:
        print(f"accuquant: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = command.interrupt_hint(args) if hasattr(command, "interrupt_hint") else ""
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
