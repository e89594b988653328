"""Settings on one option system: :class:`QuantConfig` (what to quantize) and every method's
config (how to calibrate) are dataclasses whose fields are made by :func:`option`.

A field's metadata holds its help text, whether it is a command-line flag (the CLI's
flags are generated from it), what values are valid, and how a text value is parsed.
A config validates itself when built (before any work), carries a version, and
round-trips through JSON; run and cache keys are made from its dict.

The defaults that the command line and the Python API share are written here once
(:data:`DEFAULT_METHOD` and the rest), as is the parsing of memory sizes
(:func:`parse_size`); bit widths and their labels are :mod:`accuquant.bits`' (re-exported).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from .bits import FLOAT_BITS, bits_label, parse_bits, parse_bits_label  # noqa: F401  (re-exported)
from .errors import AccuQuantError, ConfigError

FORMAT_VERSION = 1

#: the calibration run's defaults, shared by the command line and :func:`accuquant.quantize`
DEFAULT_METHOD = "accuquant"
DEFAULT_STEPS = 20
DEFAULT_CALIB_SAMPLES = 64
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_MEMORY = "2GB"

# ---------------------------------------------------------------------------- values
_UNITS = {"": 2**20, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(value) -> int:
    """Bytes of a memory size: ``"4GB"``, ``"512MB"``, ``"1.5g"`` (binary units), a bare
    number of megabytes (``"2048"``), or an int of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise AccuQuantError(f"memory size {value!r}: expected a finite size of at least 0")
        return value
    text = str(value).strip().lower().replace(" ", "")
    num = text.rstrip("kmgib")
    unit = text[len(num):]
    try:
        size = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise AccuQuantError(f"memory size {value!r}: expected a number with a unit, e.g. 4GB or 512MB") from None
    if not size >= 0 or size == float("inf"):
        raise AccuQuantError(f"memory size {value!r}: expected a finite size of at least 0")
    return int(size)


# ---------------------------------------------------------------------------- the option system
def option(default, help: str, *, cli: bool = True, flag: str | None = None, choices: tuple | None = None,
           minimum: float | None = None, maximum: float | None = None, positive: bool = False, rate: bool = False,
           parse: Callable[[Any, str], Any] | None = None, factory: Callable[[], Any] | None = None):
    """A config field: its default, help text, whether it is a command-line flag (``flag``:
    another name than the field's), and what values are valid. ``parse(value, name)``
    turns a given value (text from the command line included) into the field's value, or
    raises :class:`ConfigError`; without it the field's type is checked. ``rate``: a
    learning rate, which ``--resume`` may change (a diverged run continues with a smaller one)."""
    meta = {"help": help, "cli": cli, "flag": flag, "choices": choices, "minimum": minimum, "maximum": maximum,
            "positive": positive, "rate": rate, "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def field_type(cls, f: dataclasses.Field) -> type | None:
    """The plain type of a field (``int`` of ``int | None``), or ``None`` when it has none."""
    kind = typing.get_type_hints(cls)[f.name]
    return next((t for t in (bool, int, float, str) if t is kind or t in typing.get_args(kind)), None)


def nullable(cls, f: dataclasses.Field) -> bool:
    return type(None) in typing.get_args(typing.get_type_hints(cls)[f.name])


class Options:
    """Base of the config dataclasses: validation from the fields' :func:`option` metadata
    when built, and the JSON round trip (``WHAT`` names the config in errors)."""

    WHAT = "config"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v, meta = getattr(self, f.name), f.metadata
            if not meta:
                continue
            if meta.get("parse") is not None:
                setattr(self, f.name, meta["parse"](v, f.name))
                continue
            if v is None and nullable(type(self), f):
                continue
            base = field_type(type(self), f)
            if base is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
                setattr(self, f.name, v)
            if base is not None and (not isinstance(v, base) or (base is int and isinstance(v, bool))):
                raise ConfigError(f"{f.name}: expected {base.__name__}, got {v!r}")
            if meta.get("choices") and v not in meta["choices"]:
                raise ConfigError(f"{f.name}: {v!r} is not one of {', '.join(meta['choices'])}")
            if meta.get("positive") and not (v > 0 and v != float("inf")):
                raise ConfigError(f"{f.name}: expected a positive number, got {v!r}")
            if meta.get("minimum") is not None and not v >= meta["minimum"]:
                raise ConfigError(f"{f.name}: expected at least {meta['minimum']}, got {v!r}")
            if meta.get("maximum") is not None and not v <= meta["maximum"]:
                raise ConfigError(f"{f.name}: expected at most {meta['maximum']}, got {v!r}")

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        """The fields that are options (made by :func:`option`)."""
        return [f for f in dataclasses.fields(cls) if f.metadata]

    @classmethod
    def flags(cls) -> dict[str, dataclasses.Field]:
        """Command-line flag (the field's name with dashes, or its metadata ``flag``) -> field,
        for the options marked for the command line."""
        return {f.metadata.get("flag") or f.name.replace("_", "-"): f for f in cls.options() if f.metadata.get("cli")}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown {cls.WHAT} field")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cls.WHAT}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.WHAT}: expected a JSON object")
        return cls.from_dict(d)


# ---------------------------------------------------------------------------- what to quantize
def _bits(value, name):
    return parse_bits(value, name)


def _bits_or_act(value, name):
    return parse_bits(value, name, allow_act=True)


def _bool(value, name):
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    return value


def _patterns(value, name):
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{name}: expected a list of module-name patterns, got {value!r}")
    return tuple(value)


def _percentile(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 50.0 < float(value) <= 100.0:
        raise ConfigError(f"{name}: expected a value in (50, 100], got {value!r}")
    return float(value)


def _act_granularity(value, name):
    if value not in ("tensor", "token"):
        raise ConfigError(f"{name}: 'tensor' (static, one range) or 'token' (dynamic, each token's own range), "
                          f"got {value!r}; per channel is refused (channel ranges change with the time step)")
    return value


OUTLIER_KINDS = ("smooth", "rotate", "lowrank")


def _outliers(value, name):
    """A subset of :data:`OUTLIER_KINDS`, from a list or comma-separated text (``none``: empty)."""
    if value is None or value == "none" or value == ():
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(k, str) for k in items):
        raise ConfigError(f"{name}: expected some of {', '.join(OUTLIER_KINDS)}, got {value!r}")
    items = {k.strip() for item in items for k in item.split(",")} - {"none", ""}  # a flag is repeatable
    unknown = sorted(items - set(OUTLIER_KINDS))
    if unknown:
        raise ConfigError(f"{name}: {unknown[0]!r} is not one of {', '.join(OUTLIER_KINDS)}")
    return tuple(k for k in OUTLIER_KINDS if k in items)


def _layer_bits(value, name):
    """``{layer name: [weight bits, act bits]}`` (each 2..8 or none), or ``None``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a mapping of layer names to [weight bits, act bits], got {value!r}")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, (list, tuple)) or len(v) != 2:
            raise ConfigError(f"{name}: {k!r}: expected [weight bits, act bits], got {v!r}")
        out[k] = [parse_bits(b, f"{name}[{k}]") for b in v]
    return out


def _avg_bits(value, name):
    if value is None or value == "none":
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if isinstance(value, bool) or not 2.0 <= v <= 8.0:
        raise ConfigError(f"{name}: expected an average bit width in 2..8, or none, got {value!r}")
    return v


def _group(value, name):
    if value is None or value == "none":
        return None
    try:
        n = int(value) if isinstance(value, str) else value
    except ValueError:
        n = value
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(f"{name}: expected a group size of at least 2 inputs, or none, got {value!r}")
    return n


def _format_version(value, name):
    if value != FORMAT_VERSION:
        raise ConfigError(f"{name}: this accuquant reads version {FORMAT_VERSION}, got {value!r}")
    return value


INIT_METHODS = ("minmax", "percentile", "mse")


@dataclass
class QuantConfig(Options):
    """What to quantize and how (default: W4A8, the command line's default). Every field is
    also a flag of ``accuquant quantize`` (``weight_bits`` is ``--weight-bits``)."""

    weight_bits: int | None = option(4, "bits of weights, 2..8, or none (floating point)", parse=_bits)
    act_bits: int | None = option(8, "bits of layer inputs (activations), 2..8, or none", parse=_bits)
    weight_granularity: str = option("channel", "one weight range per output channel, or per tensor",
                                     choices=("channel", "tensor"))
    weight_group: int | None = option(None, "weights: one range per group of this many inputs of each output "
                                      "channel (64: SVDQuant's), or none: one per output channel", parse=_group)
    act_granularity: str = option("tensor", "activation ranges: tensor (static, one range per layer input, "
                                  "calibrated) or token (dynamic: each token's own range, times a learned "
                                  "clipping factor)", parse=_act_granularity)
    outliers: tuple[str, ...] = option((), "outlier handling of each quantized layer, comma-separated: smooth "
                                       "(SmoothQuant scales), rotate (Hadamard), lowrank (a floating-point branch "
                                       "of rank --rank from the SVD), or none", parse=_outliers)
    rank: int = option(32, "rank of the low-rank branch (outliers lowrank)", minimum=1)
    conv_outliers: bool = option(False, "with outliers, also give 1x1 convolutions (a linear map over channels) "
                                 "the low-rank branch, and shortcut-split ones smoothing and (1x1 ones) the "
                                 "branch, no rotation; default: convolutions smooth and rotate, split ones nothing",
                                 parse=_bool)
    smooth_alpha: float = option(0.5, "SmoothQuant's migration strength of the smoothing scales' start",
                                 minimum=0.0, maximum=1.0)
    mixed_precision: float | None = option(None, "average weight bits of a mixed-precision allocation (e.g. 4.25): "
                                           "each layer at 8, 6 or --weight-bits, chosen by the rise of the k-step "
                                           "sampling error when that layer alone is at that width; none: uniform",
                                           parse=_avg_bits)
    act_mixed_precision: float | None = option(None, "average activation bits of a mixed-precision allocation "
                                               "(e.g. 5): each layer input at 8, 6 or --act-bits, chosen the same "
                                               "way; none: uniform", parse=_avg_bits)
    layer_bits: dict[str, list] | None = option(None, "per-layer [weight bits, act bits] overriding weight_bits and "
                                                "act_bits (what a mixed-precision allocation writes)", cli=False,
                                                parse=_layer_bits)
    weight_symmetric: bool = option(False, "symmetric signed weight grid with zero point 0 (default: affine, "
                                    "an integer zero point)", parse=_bool)
    act_symmetric: bool = option(False, "symmetric activation grid (default affine)", parse=_bool)
    attn_bits: int | str | None = option("act", "bits of the attention matmul inputs (Q, K, V), 2..8, none, or act "
                                         "(the activation bits)", parse=_bits_or_act)
    softmax_bits: int | str | None = option("act", "bits of the softmax output, 2..8, none, or act",
                                            parse=_bits_or_act)
    keep_fp: tuple[str, ...] | None = option(None, "module-name pattern kept in full precision (repeatable; "
                                             "default: the model family's)", parse=_patterns)
    split_shortcut: bool = option(True, "quantize the concatenated input of UNet up-block shortcut layers as two "
                                  "parts, each with its own range", flag="no-split-shortcut", parse=_bool)
    weight_init: str = option("mse", "range search of weight quantizers", choices=INIT_METHODS)
    act_init: str = option("mse", "range search of activation quantizers, from calibration data",
                           choices=INIT_METHODS)
    percentile: float = option(99.99, "the percentile of percentile range search", parse=_percentile)
    format_version: int = option(FORMAT_VERSION, "version of this config's format", cli=False,
                                 parse=_format_version)

    WHAT = "quantization config"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixed_precision is not None and not (self.weight_bits or 9) <= self.mixed_precision <= 8:
            raise ConfigError(f"mixed_precision: the average {self.mixed_precision} must lie between weight_bits "
                              f"({self.weight_bits}, the lowest width) and 8")
        if self.act_mixed_precision is not None and not (self.act_bits or 9) <= self.act_mixed_precision <= 8:
            raise ConfigError(f"act_mixed_precision: the average {self.act_mixed_precision} must lie between "
                              f"act_bits ({self.act_bits}, the lowest width) and 8")
        if self.weight_group is not None and self.weight_granularity != "channel":
            raise ConfigError("weight_group: groups divide each output channel's inputs; it needs "
                              f"weight_granularity 'channel', not {self.weight_granularity!r}")

    # effective bit widths of the attention matmul inputs
    @property
    def resolved_attn_bits(self) -> int | None:
        return self.act_bits if self.attn_bits == "act" else self.attn_bits

    @property
    def resolved_softmax_bits(self) -> int | None:
        return self.act_bits if self.softmax_bits == "act" else self.softmax_bits

    @property
    def label(self) -> str:
        return bits_label(self.weight_bits, self.act_bits)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["keep_fp"] = None if self.keep_fp is None else list(self.keep_fp)
        d["outliers"] = list(self.outliers)
        # options added since format 1, at their default, are left out: the configs of models
        # that do not use them (saved files, run and cache keys) read as they always did
        return {k: v for k, v in d.items() if not (k in LATER and v == LATER[k])}


#: options of :class:`QuantConfig` added since its format 1, with their defaults
LATER = {"weight_group": None, "outliers": [], "rank": 32, "conv_outliers": False, "smooth_alpha": 0.5,
         "mixed_precision": None, "act_mixed_precision": None, "layer_bits": None}


# ---------------------------------------------------------------------------- how to calibrate
@dataclass
class MethodConfig(Options):
    """Base of every method's options. ``VERSION`` goes up when the same options give
    another result; it is part of run and cache keys."""

    WHAT = "method config"
    NAME: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    #: options that no longer exist or were settings of a run: ignored in saved configs
    RETIRED: ClassVar[tuple[str, ...]] = ()
    #: options added after the method's results were first kept, with their defaults
    LATER: ClassVar[dict[str, Any]] = {}

    def to_dict(self) -> dict[str, Any]:
        """Name, version and fields; a field in :attr:`LATER` at its default is left out, so
        the configs that do not use it (saved files, run and cache keys) read as before."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if not (k in self.LATER and v == self.LATER[k])}
        return {"method": self.NAME, "version": self.VERSION, **d}

    def resume_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the learning rates: what a checkpoint must match to be resumed."""
        rates = {f.name for f in dataclasses.fields(self) if f.metadata.get("rate")}
        return {k: v for k, v in self.to_dict().items() if k not in rates}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        d = dict(d)
        if d.pop("method", cls.NAME) != cls.NAME:
            raise ConfigError(f"method config: not a {cls.NAME} config")
        version = d.pop("version", cls.VERSION)
        if version != cls.VERSION:
            raise ConfigError(f"method config: {cls.NAME} version {version}; this accuquant has version {cls.VERSION}")
        for k in cls.RETIRED:
            d.pop(k, None)
        return cls.from_options(d)

    @classmethod
    def from_options(cls, options: dict) -> "MethodConfig":
        """The config from keyword options (``None`` values take the default); unknown
        options are refused naming what the method takes."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise AccuQuantError(f"method {cls.NAME!r}: unknown option(s) {', '.join(unknown)}; it takes: "
                                 f"{', '.join(sorted(names)) or 'none'}")
        return cls(**{k: v for k, v in options.items() if v is not None})

    def is_default(self) -> bool:
        return self == type(self)()
