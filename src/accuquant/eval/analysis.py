"""Error accumulation along sampling: how a quantized model drifts from its FP base.

For paired noises and labels, per sampling step ``i``:

* ``step_error``: ``||eps~(x_i) - eps(x_i)||`` on the FP trajectory's own inputs (what
  per-step calibration minimises; of a model with a sampling correction, the corrected output);
* ``accumulated_error``: ``||x~_{i+1} - x_{i+1}||`` between the full quantized and FP
  trajectories (what the quantized model actually does to a sample);
* ``fid2fp_x0``: FID2FP of the predicted clean sample ``x0`` at a few steps.

Norms are per-sample L2 norms over the whole latent, averaged over samples.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from ..calibrate.data import noise_batches
from .evaluation import base_of, feature_extractor
from .metrics import fid_from_features
from ..pipeline import Pipeline
from ..progress import progress_bar
from ..io.files import atomic_path
from ..sampling import run_trajectory

COLUMNS = ("step", "timestep", "step_error", "accumulated_error", "fid2fp_x0")


@torch.no_grad()
def error_accumulation(
    model: Pipeline,
    base=None,
    num: int = 500,
    steps: int | None = None,
    seed: int = 0,
    scheduler: str | None = None,
    x0_points: int = 5,
    features: str = "auto",
    batch_size: int = 100,
    device: str = "cpu",
    progress: bool = True,
    prompts: list[str] | None = None,
) -> list[dict]:
    """Per-step rows of :data:`COLUMNS` for ``model`` against its FP base; ``prompts``: what a
    text-conditioned model samples from (default: its own default prompts)."""
    steps, scheduler = model.sampling_settings(steps, scheduler)
    fp = base_of(model, base).to(device)
    solver = fp.solver(steps, scheduler)
    q_solver = model.solver(steps, scheduler)  # with the model's sampling correction, if it has one
    den_q, den_fp = model.denoiser(), fp.denoiser()
    cond = model.conditions(num, prompts=prompts)
    n_steps = solver.num_steps
    x0_at = sorted({round(k * (n_steps - 1) / max(1, x0_points - 1)) for k in range(x0_points)})
    step_err = torch.zeros(n_steps)
    acc_err = torch.zeros(n_steps)
    x0_q = {i: [] for i in x0_at}
    x0_fp = {i: [] for i in x0_at}
    n_batches = -(-num // batch_size)
    with progress_bar(n_batches * n_steps * 2, "error accumulation", disable=not progress) as bar:
        for idx, noise, c in noise_batches(den_fp.sample_shape, cond, num, batch_size, seed, "sample", device):
            start = idx[0]
            cb = lambda i: bar.update(1)  # noqa: E731
            # the same generator state for both runs: a stochastic sampler adds the same noise
            g_fp, g_q = (torch.Generator(device=noise.device).manual_seed(seed + start) for _ in range(2))
            _, xs_fp, outs_fp = run_trajectory(den_fp, solver, noise, c, keep=True, generator=g_fp, callback=cb)
            _, xs_q, outs_q = run_trajectory(den_q, q_solver, noise, c, keep=True, generator=g_q, callback=cb)
            for i in range(n_steps):
                eps_q_on_fp = q_solver.output(i, xs_fp[:, i], den_q(xs_fp[:, i], solver.timesteps[i], c))
                step_err[i] += (eps_q_on_fp - outs_fp[:, i]).flatten(1).norm(dim=1).sum().cpu()
                acc_err[i] += (xs_q[:, i + 1] - xs_fp[:, i + 1]).flatten(1).norm(dim=1).sum().cpu()
                if i in x0_at:
                    out_q = q_solver.output(i, xs_q[:, i], outs_q[:, i])
                    x0_q[i].append(solver.predicted_x0(i, xs_q[:, i], out_q).clamp(-1, 1).cpu())
                    x0_fp[i].append(solver.predicted_x0(i, xs_fp[:, i], outs_fp[:, i]).clamp(-1, 1).cpu())
    extractor = None
    rows = []
    for i in range(n_steps):
        row = {"step": i + 1, "timestep": int(solver.timesteps[i]), "step_error": (step_err[i] / num).item(),
               "accumulated_error": (acc_err[i] / num).item(), "fid2fp_x0": None}
        if i in x0_at:
            img_q = fp.decode(torch.cat(x0_q[i]).to(device))
            img_fp = fp.decode(torch.cat(x0_fp[i]).to(device))
            extractor = extractor or feature_extractor(features, tuple(img_q.shape[1:]))
            row["fid2fp_x0"] = fid_from_features(extractor(img_q)["pool"], extractor(img_fp)["pool"])
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: str | Path) -> None:
    with atomic_path(Path(path)) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: (float(v) if v != "" else None) for k, v in r.items()} for r in csv.DictReader(f)]


def plot(curves: dict[str, list[dict]], path: str | Path, title: str = "") -> None:
    """Accumulated and per-step error (left) and FID2FP of the predicted x0 (right), per
    sampling step, one line per model (as in the AccuQuant paper's error figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for k, (name, rows) in enumerate(curves.items()):
        color = f"C{k}"
        steps = [r["step"] for r in rows]
        ax1.plot(steps, [r["accumulated_error"] for r in rows], color=color, label=f"{name}: accumulated ||x~_t - x_t||")
        ax1.plot(steps, [r["step_error"] for r in rows], color=color, ls="--", label=f"{name}: per step ||eps~ - eps||")
        pts = [(r["step"], r["fid2fp_x0"]) for r in rows if r["fid2fp_x0"] is not None]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=name)
    ax1.set_xlabel("sampling step")
    ax1.set_ylabel("L2 distance to the FP model")
    ax1.legend(fontsize=7)
    ax1.set_title("error per step and accumulated")
    ax2.set_xlabel("sampling step")
    ax2.set_ylabel("FID2FP of predicted x0")
    ax2.legend(fontsize=7)
    ax2.set_title("predicted x0 against FP")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
