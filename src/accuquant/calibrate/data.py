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

import json
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..models import Conditions, Denoiser
from ..cache import derive_seed, digest
from .distributed import gather_rows, is_main, rows, world
from ..config import DEFAULT_BATCH_SIZE
from ..errors import AccuQuantError
from ..progress import progress_bar
from ..io.files import atomic_path
from ..io.safetensors import RowFile, check_safetensors, map_file
from ..sampling import Solver, run_trajectory

FORMAT = "accuquant.trajectories/1"


def seeded_noise(shape: tuple[int, ...], seed: int, indices, stream: str) -> torch.Tensor:
    """Gaussian noise, one generator per sample: sample ``k`` of ``(seed, stream)`` is the
    same whatever the batch. ``stream`` keeps calibration noise apart from evaluation noise."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(stream, seed, k)))
                        for k in indices])


def noise_batches(shape: tuple[int, ...], cond: Conditions, num: int, batch_size: int, seed: int, stream: str,
                  device="cpu", first: int = 0):
    """Yield ``(indices, noise, conditions)`` for samples ``first..num-1`` in batches: sample
    ``k`` gets the ``k``-th noise of ``(seed, stream)`` and the ``k``-th condition."""
    for start in range(first, num, batch_size):
        idx = list(range(start, min(num, start + batch_size)))
        noise = seeded_noise(shape, seed, idx, stream).to(device)
        c = cond.index(torch.tensor(idx)).to(device)
        yield idx, noise, c


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

    def digest(self) -> str:
        """A key over every tensor of the set (computed once)."""
        if getattr(self, "_digest", None) is None:
            self._digest = digest({"cond": [k for k, _ in self.cond.items()]}, self.xs, self.outs, self.timesteps,
                                  *(v for _, v in self.cond.items()))
        return self._digest

    def points(self, per_step: int, seed: int) -> list[tuple[int, int]]:
        """``(trajectory, step)`` pairs: ``per_step`` random trajectories at every step, shuffled."""
        n, s = self.num_samples, self.num_steps
        per_step = max(1, min(n, per_step))
        g = torch.Generator().manual_seed(seed)
        pairs = [(int(k), i) for i in range(s) for k in torch.randperm(n, generator=g)[:per_step]]
        order = torch.randperm(len(pairs), generator=g)
        return [pairs[j] for j in order]

    def batches(self, points: list[tuple[int, int]], batch_size: int, device="cpu"):
        """Yield ``(x_t, t, cond)`` batches of ``batch_size`` points (one timestep per sample)."""
        for start in range(0, len(points), batch_size):
            chunk = points[start : start + batch_size]
            k = torch.tensor([p[0] for p in chunk])
            i = torch.tensor([p[1] for p in chunk])
            yield self.xs[k, i].to(device), self.timesteps[i].to(device), self.cond.index(k).to(device)

    def save(self, path: str | Path) -> None:
        tensors = {"xs": self.xs.contiguous(), "outs": self.outs.contiguous(), "timesteps": self.timesteps.contiguous()}
        tensors.update(self.cond.to_tensors())
        with atomic_path(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(self.meta, default=str)})

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> "Trajectories":
        """A saved set; with ``mmap`` its tensors are views of the file mapped in memory, read
        from the disk by the rows that are used (the page cache holds them, not the process's
        own memory), so a large set costs no RAM until it is read."""
        path = Path(path)
        check_safetensors(path)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
        if md.get("format") != FORMAT:
            raise AccuQuantError(f"{path}: not an accuquant calibration file")
        t = (map_file(path) if mmap else None) or load_file(str(path))
        return cls(t["xs"], t["outs"], t["timesteps"], Conditions.from_tensors(t), json.loads(md.get("meta", "{}")))


@torch.no_grad()
def collect_trajectories(
    denoiser: Denoiser,
    scheduler: Solver,
    num: int,
    seed: int = 0,
    cond: Conditions | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stream: str = "calib",
    path: str | Path | None = None,
    meta: dict | None = None,
) -> Trajectories:
    """Run the FP ``denoiser`` from ``num`` seeded noises and keep every step.

    Args:
        denoiser: the full-precision model behind its adapter (guidance included).
        scheduler: the sampler (:func:`~accuquant.sampling.make_solver`), with the steps used
            at inference.
        num: number of trajectories.
        seed: noise seed (sample ``k`` uses the ``k``-th noise of this seed).
        cond: per-sample conditions (``num`` of them), or ``None`` for an unconditional model.
        batch_size: trajectories run at once.
        device: where to run; results are returned on the CPU.
        progress: show a progress bar over denoiser evaluations.
        path: also save the set there (atomically); in one process the rows go to the file
            batch by batch and the set returned is mapped from it, so collecting holds one
            batch of trajectories in memory, not all of them.
        meta: more metadata to keep with the set.

    Under ``torch.distributed`` each rank runs its share of the samples and every rank
    returns all of them (rank 0 saves them to ``path``).
    """
    if scheduler.stochastic:
        raise AccuQuantError(f"scheduler {scheduler.name!r} is stochastic: calibration trajectories need a "
                             "deterministic one")
    cond = cond if cond is not None else Conditions()
    if cond.batch_size not in (0, num):
        raise AccuQuantError(f"calibration: {cond.batch_size} conditions for {num} samples")
    if num < world()[1]:
        raise AccuQuantError(f"{num} calibration samples cannot be shared by {world()[1]} ranks")
    mine = rows(num)
    meta = {
        "num": num,
        "seed": seed,
        "guidance_scale": denoiser.guidance_scale,
        **{k: v for k, v in scheduler.describe().items() if k != "scheduler_config"},
        "scheduler_config": json.loads(json.dumps(scheduler.describe()["scheduler_config"], default=str)),
        **(meta or {}),
    }
    timesteps, steps, shape = scheduler.timesteps.clone(), scheduler.num_steps, tuple(denoiser.sample_shape)
    xs, outs = [], []
    n_batches = math.ceil(len(mine) / batch_size)
    with ExitStack() as stack:
        file = None
        if path is not None and world()[1] == 1:  # streamed to the file, batch by batch
            tmp = stack.enter_context(atomic_path(Path(path)))
            small = {"timesteps": timesteps.contiguous(), **cond.to_tensors()}
            file = RowFile(tmp, {"xs": (torch.float32, (num, steps + 1, *shape)),
                                  "outs": (torch.float32, (num, steps, *shape))}, small,
                            {"format": FORMAT, "meta": json.dumps(meta, default=str)})
            stack.callback(file.close)
        bar = stack.enter_context(progress_bar(total=n_batches * steps, desc="FP trajectories",
                                               disable=not (progress and is_main())))
        for idx, noise, c in noise_batches(denoiser.sample_shape, cond, mine.stop, batch_size, seed, stream, device,
                                           first=mine.start):
            _, x, o = run_trajectory(denoiser, scheduler, noise, c, keep=True, callback=lambda i: bar.update(1))
            bad = ~torch.isfinite(o.flatten(2)).all(2).all(0)  # per step: a non-finite model output
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise AccuQuantError(f"the FP model's output is not finite (NaN or inf) at sampling step {i} "
                                     f"(timestep {float(scheduler.timesteps[i]):g}): it cannot be calibrated on")
            if file is not None:
                file.write("xs", idx[0], x.float())
                file.write("outs", idx[0], o.float())
            else:
                xs.append(x.cpu())
                outs.append(o.cpu())
    if file is not None:
        return Trajectories.load(path)
    traj = Trajectories(gather_rows(torch.cat(xs)), gather_rows(torch.cat(outs)), timesteps, cond, meta)
    if path is not None and is_main():
        traj.save(path)
    return traj
