"""Calibration data: whole full-precision sampling trajectories, saved as safetensors.

For ``N`` seeded noises (and their labels or prompt embeddings) the FP model is run
through every step of the solver, and the trajectory is kept: ``xs[n, i]`` is the
sample entering step ``i`` (``xs[n, S]`` is the final sample), ``outs[n, i]`` the
(guided) model output at step ``i``, ``timesteps[i]`` its timestep. Per-step methods
draw ``(x_t, t)`` pairs from it; AccuQuant starts its multistep simulations from it
and compares with its later samples; multistep solvers rebuild their state from
``outs``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .adapters import Conditions, Denoiser
from .errors import AccuQuantError
from .progress import progress_bar
from .safety import atomic_path, check_safetensors
from .sampling import Solver, run_trajectory

FORMAT = "accuquant.trajectories/1"


def seeded_noise(shape: tuple[int, ...], seed: int, indices, stream: str) -> torch.Tensor:
    """Gaussian noise, one generator per sample: sample ``k`` of ``(seed, stream)`` is the
    same whatever the batch. ``stream`` keeps calibration noise apart from evaluation noise."""
    out = []
    for k in indices:
        h = hashlib.sha256(f"{stream}:{seed}:{k}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
        out.append(torch.randn(shape, generator=g))
    return torch.stack(out)


def noise_batches(shape: tuple[int, ...], cond: Conditions, num: int, batch_size: int, seed: int, stream: str,
                  device="cpu"):
    """Yield ``(indices, noise, conditions)`` for samples ``0..num-1`` in batches: sample ``k``
    gets the ``k``-th noise of ``(seed, stream)`` and the ``k``-th condition."""
    for start in range(0, num, batch_size):
        idx = list(range(start, min(num, start + batch_size)))
        noise = seeded_noise(shape, seed, idx, stream).to(device)
        c = cond.index(torch.tensor(idx)).to(device) if len(cond) else cond
        yield idx, noise, c


def settings_key(fingerprint: str, solver_desc: dict, num: int, seed: int, guidance: float, cond: Conditions) -> str:
    """A short hash naming a cached set of samples: model, solver, counts, seed, guidance, conditions."""
    h = hashlib.sha256(fingerprint.encode())
    h.update(json.dumps({"solver": solver_desc, "num": num, "seed": seed, "g": guidance},
                        sort_keys=True, default=str).encode())
    for k, v in cond.items():
        h.update(k.encode())
        h.update(v.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


@dataclass
class Trajectories:
    """Stored FP trajectories (see the module docstring)."""

    xs: torch.Tensor
    outs: torch.Tensor
    timesteps: torch.Tensor
    cond: Conditions
    meta: dict

    @property
    def num_samples(self) -> int:
        return self.xs.shape[0]

    @property
    def num_steps(self) -> int:
        return self.outs.shape[1]

    @property
    def final(self) -> torch.Tensor:
        return self.xs[:, -1]

    def save(self, path: str | Path) -> None:
        tensors = {"xs": self.xs.contiguous(), "outs": self.outs.contiguous(), "timesteps": self.timesteps.contiguous()}
        tensors.update(self.cond.to_tensors())
        with atomic_path(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(self.meta, default=str)})

    @classmethod
    def load(cls, path: str | Path) -> "Trajectories":
        path = Path(path)
        check_safetensors(path)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
        if md.get("format") != FORMAT:
            raise AccuQuantError(f"{path}: not an accuquant calibration file")
        t = load_file(str(path))
        return cls(t["xs"], t["outs"], t["timesteps"], Conditions.from_tensors(t), json.loads(md.get("meta", "{}")))


def default_conditions(denoiser: Denoiser, num: int, num_classes: int | None = None) -> Conditions:
    """Balanced class labels ``k % num_classes`` for class-conditional models; nothing otherwise."""
    if denoiser.conditioning == "class":
        if not num_classes:
            raise AccuQuantError("class-conditional model: the number of classes is unknown")
        return Conditions(labels=torch.arange(num) % num_classes)
    if denoiser.conditioning == "text":
        raise AccuQuantError("text-conditioned model: calibration needs prompts (prompt embeddings)")
    return Conditions()


@torch.no_grad()
def collect_trajectories(
    denoiser: Denoiser,
    solver: Solver,
    num: int,
    seed: int = 0,
    cond: Conditions | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stream: str = "calib",
) -> Trajectories:
    """Run the FP ``denoiser`` from ``num`` seeded noises and keep every step.

    Args:
        denoiser: the full-precision model behind its adapter (guidance included).
        solver: the sampler; its step count and scheduler are the ones used at inference.
        num: number of trajectories.
        seed: noise seed (sample ``k`` uses the ``k``-th noise of this seed).
        cond: per-sample conditions (``num`` of them), or ``None`` for an unconditional model.
        batch_size: trajectories run at once.
        device: where to run; results are returned on the CPU.
        progress: show a progress bar over denoiser evaluations.
    """
    if solver.stochastic:
        raise AccuQuantError(f"scheduler {solver.name!r} is stochastic: calibration trajectories need a deterministic one")
    cond = cond if cond is not None else Conditions()
    if len(cond) not in (0, num):
        raise AccuQuantError(f"calibration: {len(cond)} conditions for {num} samples")
    xs, outs = [], []
    n_batches = math.ceil(num / batch_size)
    with progress_bar(total=n_batches * solver.num_steps, desc="FP trajectories", disable=not progress) as bar:
        for _, noise, c in noise_batches(denoiser.sample_shape, cond, num, batch_size, seed, stream, device):
            _, x, o = run_trajectory(denoiser, solver, noise, c, keep=True, callback=lambda i: bar.update(1))
            xs.append(x.cpu())
            outs.append(o.cpu())
    meta = {
        "num": num,
        "seed": seed,
        "guidance_scale": denoiser.guidance_scale,
        **{k: v for k, v in solver.describe().items() if k != "scheduler_config"},
        "scheduler_config": json.loads(json.dumps(solver.describe()["scheduler_config"], default=str)),
    }
    return Trajectories(torch.cat(xs), torch.cat(outs), solver.timesteps.clone(), cond, meta)
