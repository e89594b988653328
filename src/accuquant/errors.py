"""The exception types that the command line turns into a one-line message, and the checks
of a device and a model's weights that raise them."""

import torch


class AccuQuantError(Exception):
    """A problem with the user's input (a config value, a path, a file), not a bug.

    The command line prints ``accuquant: error: <message>`` and exits with status 2.
    """


class DivergenceError(AccuQuantError):
    """Calibration produced a non-finite loss, gradient or quantizer parameter; the message
    names the method, unit, iteration and quantity. The last checkpoint is kept."""


class ConfigError(AccuQuantError, ValueError):
    """An invalid configuration value; the message names the field."""


def check_device(device: str) -> None:
    """Refuse a device that is not ``cpu``, ``cuda`` or an existing ``cuda:N``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise AccuQuantError(f"device: expected cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AccuQuantError("device cuda: no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise AccuQuantError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s)")


def check_finite(model: torch.nn.Module, what: str) -> None:
    """Refuse weights holding NaN or inf."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
            raise AccuQuantError(f"{what}: weights contain NaN or inf (first in {name})")
