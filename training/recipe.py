"""What the training scripts share beyond the data: the learning-rate schedule, the EMA of
the weights, and writing a model directory so that a crash never leaves half of one."""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Callable

import torch


def cosine_lr(opt: torch.optim.Optimizer, total: int, warmup: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` iterations, then cosine decay to zero at ``total``."""
    def factor(k: int) -> float:
        ramp = min(1.0, (k + 1) / warmup) if warmup else 1.0
        return ramp * 0.5 * (1 + math.cos(math.pi * min(k, total) / total))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """One update of the exponential moving average of ``model``'s weights, after optimiser
    step ``step`` (1-based); the decay ramps up from 0.18 so that early averages are not
    dominated by the random initialisation."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - d)


def save_atomically(out: str, write: Callable[[str], None], json_files: dict | None = None) -> None:
    """Write a model directory through ``write(tmp_dir)`` plus ``json_files`` (name -> object),
    then replace ``out`` with it, so ``out`` is always a complete directory."""
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    for name, obj in (json_files or {}).items():
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(obj, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
