"""Method configs and the method registry.

A method's options are a :class:`MethodConfig` dataclass: it validates itself when built
(before any work), round-trips through JSON, carries the method's version, and is what
run and cache keys are made of. Each field's ``metadata`` holds its help text and, for
options on the command line, its flag: the CLI is generated from these fields.

The registry maps a name to the method class; it imports no method (the package's
``__init__`` imports the built-in ones, which register themselves).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import JSONConfig
from ..errors import AccuQuantError, ConfigError


def option(default, help: str, *, cli: bool = True, flag: str | None = None, choices: tuple | None = None,
           minimum: float | None = None, maximum: float | None = None, positive: bool = False, rate: bool = False):
    """A config field: its default, help text, whether it is a command-line flag (``flag``:
    another name than the field's), and what values are valid. ``rate``: a learning rate,
    which ``--resume`` may change (a diverged run continues with a smaller one)."""
    meta = {"help": help, "cli": cli, "flag": flag, "choices": choices, "minimum": minimum, "maximum": maximum,
            "positive": positive, "rate": rate}
    return field(default=default, metadata=meta)


@dataclass
class MethodConfig(JSONConfig):
    """Base of every method's options. ``VERSION`` goes up when the same options give
    another result; it is part of run and cache keys."""

    WHAT = "method config"
    NAME: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    #: options that were settings of a run, not of the method: ignored in saved configs
    RETIRED: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v, meta, kind = getattr(self, f.name), f.metadata, hints[f.name]
            if v is None and type(None) in typing.get_args(kind):
                continue
            base = next((t for t in (bool, int, float, str) if t is kind or t in typing.get_args(kind)), None)
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

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.NAME, "version": self.VERSION, **dataclasses.asdict(self)}

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
        return options_of(cls.NAME, d)

    def is_default(self) -> bool:
        return self == type(self)()


#: name -> method class (with a ``Config`` attribute)
METHODS: dict[str, type] = {}


def register_method(cls):
    """Class decorator: register a method under its config's ``NAME``."""
    METHODS[cls.Config.NAME] = cls
    return cls


def method_class(name: str):
    if name not in METHODS:
        raise AccuQuantError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def config_class(name: str) -> type[MethodConfig]:
    return method_class(name).Config


def options_of(name: str, options: dict) -> MethodConfig:
    """Method ``name``'s config from keyword options (``None`` values take the default);
    unknown options are refused naming what the method takes."""
    cls = config_class(name)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise AccuQuantError(f"method {name!r}: unknown option(s) {', '.join(unknown)}; it takes: "
                             f"{', '.join(sorted(names)) or 'none'}")
    return cls(**{k: v for k, v in options.items() if v is not None})


def method_config(method, options: dict | None = None) -> MethodConfig:
    """A validated config from a method name and options, or a config given as it is."""
    if isinstance(method, MethodConfig):
        if options:
            raise AccuQuantError("pass method options either in the config or as keywords, not both")
        return method
    return options_of(method, options or {})
