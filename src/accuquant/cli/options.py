"""What the commands share: the one-line parser, argument types, the flags generated from
the option system (:func:`accuquant.config.option`: :class:`~accuquant.config.QuantConfig`
and every method's config), the sampling and prompt arguments, and the checks that run
before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from ..config import DEFAULT_BATCH_SIZE, DEFAULT_STEPS, QuantConfig, field_type
from ..errors import AccuQuantError

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"accuquant: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


# ---------------------------------------------------------------------------- argument types
def labels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class labels, got {text!r}") from None


def size(text: str) -> int:
    from ..config import parse_size

    try:
        return parse_size(text)
    except AccuQuantError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def non_negative(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return v


# ---------------------------------------------------------------------------- flags from the option system
# A flag is generated from a config field's option() metadata: its name is the field's with
# dashes (or metadata "flag"), a bool field is a switch to the other value (store_true for a
# default of False; --no-split-shortcut for split_shortcut's True), a tuple field is
# repeatable, and a field with a "parse" takes text that goes through it when the config is
# built (its error, naming the field, is the one-line usage error). Not given: None, so that
# the config's own default applies.

def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f.name.replace("_", "-")


def method_flags() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Command-line flag -> ``(method, config field)`` for every method option marked for the
    command line (several methods may share a flag, such as ``--iters``)."""
    from ..methods import METHODS

    flags: dict[str, list] = {}
    for name, cls in METHODS.items():
        for f in cls.Config.options():
            if f.metadata.get("cli"):
                flags.setdefault(flag_name(f), []).append((name, f))
    return flags


def quant_flags() -> dict[str, dataclasses.Field]:
    """Command-line flag -> :class:`~accuquant.config.QuantConfig` field, for every option marked
    for the command line."""
    return QuantConfig.flags()


def _is_tuple(cls, f: dataclasses.Field) -> bool:
    kind = typing.get_type_hints(cls)[f.name]
    return any(typing.get_origin(t) in (tuple, list) for t in (kind, *typing.get_args(kind)))


def _lenient(kind):
    """Text to ``kind`` where it reads as one, else the text (for a field's ``parse``: bit
    widths take ``none`` and ``act`` too)."""

    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            return text

    convert.__name__ = kind.__name__
    return convert


def add_option_flag(group, flag: str, entries: list[tuple[type, str, dataclasses.Field]], more: str = "") -> None:
    """Add ``--flag`` for config fields ``entries`` (``(config class, owner, field)``; several
    methods may share a flag; ``more``: help after theirs); ``dest`` is the flag with underscores."""
    cls, _, f = entries[0]
    dest = flag.replace("-", "_")
    parts = []
    for owner_cls, owner, g in entries:
        choices = g.metadata.get("choices")
        text = g.metadata["help"] + (f" ({', '.join(choices)})" if choices else "")
        if field_type(owner_cls, g) is bool:
            text += " (on by default; this flag turns it off)" if g.default else ""
        elif g.default is not None and g.default != ():
            text += f" (default {g.default})"
        parts.append(f"{owner}: {text}" if owner else text)
    help_text = ("; ".join(parts) + more).replace("%", "%%")
    if field_type(cls, f) is bool:
        group.add_argument("--" + flag, dest=dest, action="store_const", const=not f.default, default=None,
                           help=help_text)
    elif _is_tuple(cls, f):
        group.add_argument("--" + flag, dest=dest, action="append", default=None, help=help_text)
    else:
        kinds = {field_type(c, g) for c, _, g in entries}
        kind = float if float in kinds else int if int in kinds else str
        if any(g.metadata.get("parse") for _, _, g in entries) and kind is not str:
            kind = _lenient(kind)
        group.add_argument("--" + flag, dest=dest, type=kind, default=None, help=help_text)


def add_method_flags(group) -> None:
    """The method options, generated from each method's config (``--batch-size`` aside: it is
    every command's pass size, and AccuQuant's trajectory batch)."""
    from ..methods import config_class

    for flag, entries in method_flags().items():
        if flag != "batch-size":
            add_option_flag(group, flag, [(config_class(m), m, f) for m, f in entries])


def add_quant_flags(group, more: dict[str, str] | None = None, skip=()) -> None:
    """The quantization options, generated from :class:`~accuquant.config.QuantConfig`
    (``more``: field name -> help after the field's own; ``skip``: fields left out)."""
    for flag, f in quant_flags().items():
        if f.name in skip:
            continue
        add_option_flag(group, flag, [(QuantConfig, "", f)], (more or {}).get(f.name, ""))


def given(args, flags) -> dict[str, typing.Any]:
    """``flag -> value`` of the flags given on the command line."""
    out = {}
    for flag in flags:
        v = getattr(args, flag.replace("-", "_"), None)
        if v is not None:
            out[flag] = v
    return out


def quant_config(args) -> QuantConfig:
    """The :class:`~accuquant.config.QuantConfig` of the flags given (the others: its defaults);
    a bad value is refused naming the field."""
    kw = {f.name: (tuple(v) if isinstance(v, list) else v)
          for flag, f in quant_flags().items() for v in [getattr(args, flag.replace("-", "_"), None)]
          if v is not None}
    return QuantConfig(**kw)


def family_keep_fp() -> str:
    """The layers each model family keeps in full precision by default, for help texts."""
    from ..models import families

    by = {}
    for cls in families():
        by.setdefault(tuple(cls.keep_fp), []).append(cls.family)
    return "; ".join(f"{'/'.join(names)}: {', '.join(keep) or 'none'}" for keep, names in by.items())


# ---------------------------------------------------------------------------- shared arguments
def bundled_help() -> str:
    from ..bundled import MODELS

    return f"a bundled model ({MODELS[0]}, the default; {'; '.join(MODELS[1:])})"


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", default=None, help="prompt for text-conditioned models "
                   "(repeatable; default: the model's own prompts, if it has them)")
    p.add_argument("--prompt-file", default=None, help="a text file of prompts, one per line (with --prompt: "
                   "both)")


def add_sampling_args(p: argparse.ArgumentParser, conditioning: bool = True) -> None:
    """``conditioning``: also guidance and labels (an evaluation uses the model's own guidance
    and balanced labels); every command that samples takes prompts."""
    p.add_argument("--steps", type=positive, default=None, help=f"sampling steps (default {DEFAULT_STEPS}, or "
                   "those a quantized model was calibrated for)")
    p.add_argument("--scheduler", default=None, help="ddim, ddpm, pndm (plms), dpm++ or flow-euler (default: the "
                   "one a quantized model was calibrated for, else flow-euler for a flow-matching model, else ddim)")
    if conditioning:
        p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: the "
                       "model's)")
        p.add_argument("--labels", type=labels, default=None, help="class labels, comma-separated (default: "
                       "balanced)")
    add_prompt_args(p)
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    traj = dict(method_flags()).get("batch-size", [])
    extra = "".join(f"; {m}: {f.metadata['help']} (default {f.default})" for m, f in traj)
    p.add_argument("--batch-size", type=positive, default=None, help=f"samples per forward pass (default "
                   f"{DEFAULT_BATCH_SIZE}){extra}")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_lora_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--lora", default=None, help=f"a LoRA (diffusers/PEFT safetensors file or directory) applied to "
                   f"{what}, in floating point beside the quantized layers")
    p.add_argument("--lora-strength", type=float, default=1.0, help="the LoRA's strength (default 1)")


def apply_lora(args, *pipes) -> None:
    """Attach ``--lora`` at ``--lora-strength`` to each pipeline (a bad LoRA is refused in one line)."""
    if args.lora:
        for p in {id(p): p for p in pipes}.values():  # an FP model is its own base
            p.load_lora_weights(args.lora, strength=args.lora_strength)


def model_arg(args) -> str:
    """The ``--model`` given (a bundled model's name or ``bundled:NAME`` as its directory), or
    the default bundled model."""
    from ..bundled import DEFAULT_MODEL, resolve_ref

    return resolve_ref(args.model) if args.model is not None else str(DEFAULT_MODEL)


def prompts(args) -> list[str] | None:
    """``--prompt`` values, then the lines of ``--prompt-file`` (blank lines skipped)."""
    out = list(getattr(args, "prompt", None) or [])
    path = getattr(args, "prompt_file", None)
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise AccuQuantError(f"{path}: cannot read the prompt file ({type(e).__name__})") from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise AccuQuantError(f"{path}: no prompts in the file")
        out += lines
    return out or None


def check_scheduler(name: str | None) -> None:
    from ..sampling import solver_class

    if name is not None:
        solver_class(name)


def check_output_file(out: Path, overwrite: bool, *sources) -> None:
    """Refuse, before any work, an output file that exists (unless ``overwrite``), that lies
    in an input model's directory (``sources``), or that cannot be written."""
    from ..io.files import check_not_inside, check_writable

    for source in sources:
        check_not_inside(out, source)
    if out.exists() and not overwrite:
        raise AccuQuantError(f"{out}: exists (pass --overwrite to replace it)")
    check_writable(out)


def denoiser_class(model) -> str | None:
    """The denoiser class a model directory names (an accuquant model's record, a pipeline's
    ``model_index.json``, a model's ``config.json``), read without loading anything; ``None``
    where it names none (a hub id, a damaged file: the loader says what is wrong)."""
    import json

    from ..models import denoiser_names

    root = Path(str(model))

    def read(name):
        try:
            d = json.loads((root / name).read_text())
        except (OSError, ValueError):
            return None
        return d if isinstance(d, dict) else None

    if (d := read("accuquant.json")) is not None:
        return d.get("denoiser_class")
    if (d := read("model_index.json")) is not None:
        spec = next((d[n] for n in denoiser_names() if isinstance(d.get(n), list) and len(d[n]) == 2), None)
        return spec[1] if spec else None
    if (d := read("config.json")) is not None:
        return d.get("_class_name")
    return None


def check_images(what: str, *models) -> None:
    """Refuse, before any work, a command that makes or scores images (``what``) on a video
    model (each of ``models``: directories, ``None`` skipped)."""
    from ..pipeline import check_images as check

    for model in models:
        if model is not None and isinstance(name := denoiser_class(model), str):
            check(name, what)


def print_placement(pipe, backend: str) -> None:
    """Which backend runs the quantized layers, when one other than ``fake`` was asked for."""
    from ..backends.placement import placement

    if backend == "fake" or not pipe.quant:
        return
    where = placement(pipe.model)
    on, off = where.get(backend, []), [n for k, v in where.items() if k != backend for n in v]
    print(f"backend {backend}: {len(on)} layers on its kernels, {len(off)} on fake"
          + (f" (first: {off[0]})" if off else ""))
