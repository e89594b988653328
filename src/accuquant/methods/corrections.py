"""Corrections at sampling time: composable with any calibration method (``--correct NAME``,
``method+NAME``; ``--method NAME`` alone is per-step with it).

A correction is estimated once, when a model is quantized, from the quantized model's
outputs on the FP calibration trajectories, and saved with the model (``correction`` in
``accuquant.json``, a few numbers per step). At sampling it acts inside the sampler's step
(:class:`CorrectedSolver`), so it runs on every backend and after loading. Its statistics
are kept by timestep and read at a solver's timesteps (linearly between two stored ones),
so the model may be sampled with other step counts than it was calibrated with.

* ``ptqd`` (PTQD, He et al., NeurIPS 2023): the quantization error of the model output,
  ``e = out~ - out``, is split at each step into a part correlated with the output,
  ``k out`` (``k``: the least-squares slope over the calibration points, at least
  :data:`K_FLOOR`), and a residual ``r``. The output becomes ``(out~ - mu) / (1 + k)``, with ``mu`` the
  residual's per-channel mean (bias correction); a stochastic sampler (``ddpm``) adds less
  noise by the residual variance the step passes on (variance-schedule calibration). A
  deterministic sampler has no noise to take it from: there the variance is kept and unused.
* ``tac`` (TAC-Diffusion, Yao et al., ECCV 2024; our reading, docs/methods.md): the output
  is scaled per step and channel by the least-squares factor towards the FP output, pulled
  towards 1 (noise-estimation reconstruction); then the quantized model's own trajectories
  from the calibration noises are run with it, and each step's per-channel drift of the
  sample from the FP trajectory is removed from the sample before the next model call
  (input bias correction).
* ``qncd`` (QNCD, Chu et al., ACM MM 2024; inter-step noise): per step, the mean
  quantization noise of the output (quantized minus FP) on the calibration trajectories'
  final samples noised again to that step's level, subtracted from the output. QNCD
  estimates it while sampling, every few steps, against the known noise; here it is
  estimated once, against the FP model (docs/methods.md says why).

Every estimate takes the quantized ``denoiser``, the calibration ``solver`` and ``calib``
trajectories, and ``reference``, the FP model's call (the quantizers off), which is there
while a model is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import AccuQuantError
from ..progress import progress_bar

#: PTQD's ``k`` is kept above this: an output shrunk to half is at most doubled back
K_FLOOR = -0.5

#: name -> correction class
CORRECTIONS: dict[str, type["Correction"]] = {}

#: the calibration method of the shorthand ``--method NAME`` for a correction ``NAME``
SHORTHAND_BASE = "per-step"


def register_correction(cls):
    CORRECTIONS[cls.NAME] = cls
    return cls


def split_method(name: str, correct: str | None = None) -> tuple[str, str | None]:
    """``(method, correction)`` of a method name: ``accuquant+ptqd`` is AccuQuant with PTQD's
    correction, ``ptqd`` alone per-step with it; ``correct`` (``--correct``) adds one to a
    name that has none. Unknown corrections are refused with the choices."""
    base, plus, corr = name.partition("+")
    if not plus and name in CORRECTIONS:
        base, corr = SHORTHAND_BASE, name
    corr = corr or None
    if correct is not None:
        if corr is not None and corr != correct:
            raise AccuQuantError(f"method {name!r} already has the correction {corr}; --correct {correct} conflicts")
        corr = correct
    if corr is not None and corr not in CORRECTIONS:
        raise AccuQuantError(f"unknown correction {corr!r}; choose one of: {', '.join(CORRECTIONS)}")
    return base, corr


def _channel_view(v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over ``out`` (``B, C, ...``)."""
    return v.view(1, -1, *([1] * (out.dim() - 2)))


@dataclass
class Correction:
    """Statistics by timestep (``stats[name][j]`` belongs to ``timesteps[j]``) and what the
    sampler's step does with them; subclasses estimate them (:meth:`estimate`) and define
    the hooks they need (:meth:`output`, :meth:`noise_factor`, :meth:`next_sample`)."""

    NAME = "base"
    VERSION = 1

    timesteps: torch.Tensor
    stats: dict[str, torch.Tensor]
    log: dict = field(default_factory=dict)

    # ------------------------------------------------------------ reading by timestep
    def at(self, t) -> dict[str, torch.Tensor]:
        """The statistics at timestep ``t``: a stored one's own, else interpolated linearly
        between the two stored timesteps around it (the nearest outside their range)."""
        ts = self.timesteps.double()
        t = float(t)
        exact = (ts == t).nonzero()
        if len(exact):
            j = int(exact[0])
            return {k: v[j] for k, v in self.stats.items()}
        order = torch.argsort(ts)
        s = ts[order]
        if t <= s[0] or t >= s[-1]:
            j = int(order[0] if t <= s[0] else order[-1])
            return {k: v[j] for k, v in self.stats.items()}
        hi = int(torch.searchsorted(s, torch.tensor(t, dtype=torch.float64)))
        a, b = int(order[hi - 1]), int(order[hi])
        w = (t - float(ts[a])) / (float(ts[b]) - float(ts[a]))
        return {k: (1 - w) * v[a] + w * v[b] for k, v in self.stats.items()}

    @classmethod
    def estimate(cls, denoiser, solver, calib, batch_size: int, device="cpu", progress: bool = True,
                 reference=None) -> "Correction":
        """The statistics of the quantized ``denoiser`` on the ``calib`` trajectories of
        ``solver`` (``reference``: the FP model's call)."""
        raise NotImplementedError

    # ------------------------------------------------------------ the hooks
    def output(self, stats: dict, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The model output the step uses instead of ``out``."""
        return out

    def noise_factor(self, stats: dict, solver, i: int) -> float:
        """The factor on the noise a stochastic sampler adds at step ``i`` (1: unchanged)."""
        return 1.0

    def next_sample(self, stats: dict, x: torch.Tensor) -> torch.Tensor:
        """The sample given to the model at a step (``stats``: that step's) instead of ``x``."""
        return x

    # ------------------------------------------------------------ saving
    def to_dict(self) -> dict:
        """JSON-ready: float32 values as Python floats, which read back exactly."""
        return {"name": self.NAME, "version": self.VERSION, "timesteps": self.timesteps.tolist(),
                "stats": {k: v.tolist() for k, v in self.stats.items()}, "log": self.log}

    @staticmethod
    def from_dict(d: dict, source: str = "correction") -> "Correction":
        name, version = d.get("name"), d.get("version")
        if name not in CORRECTIONS:
            raise AccuQuantError(f"{source}: unknown correction {name!r} (made by a newer accuquant?)")
        cls = CORRECTIONS[name]
        if not isinstance(version, int) or version > cls.VERSION:
            raise AccuQuantError(f"{source}: {name} correction version {version!r}; this accuquant knows up to "
                                 f"{cls.VERSION}: upgrade accuquant to load it")
        return cls(torch.tensor(d["timesteps"], dtype=torch.float32),
                   {k: torch.tensor(v, dtype=torch.float32) for k, v in d["stats"].items()}, d.get("log", {}))


@dataclass
class _Moments:
    """Float64 sums over a step's calibration points of the error ``e`` against the FP output ``o``."""

    ee: float = 0.0
    eo: float = 0.0
    oo: float = 0.0
    e_sum: float = 0.0
    o_sum: float = 0.0
    count: int = 0
    e_c: torch.Tensor | None = None  # per-channel sums
    o_c: torch.Tensor | None = None
    ee_c: torch.Tensor | None = None
    eo_c: torch.Tensor | None = None
    oo_c: torch.Tensor | None = None
    n_c: int = 0  # elements per channel

    def add(self, e: torch.Tensor, o: torch.Tensor) -> None:
        e, o = e.double(), o.double()
        self.ee += float((e * e).sum())
        self.eo += float((e * o).sum())
        self.oo += float((o * o).sum())
        self.e_sum += float(e.sum())
        self.o_sum += float(o.sum())
        self.count += e.numel()
        dims = [d for d in range(e.dim()) if d != 1]
        for name, v in (("e_c", e), ("o_c", o), ("ee_c", e * e), ("eo_c", e * o), ("oo_c", o * o)):
            total = v.sum(dims)
            setattr(self, name, total if getattr(self, name) is None else getattr(self, name) + total)
        self.n_c += e.numel() // e.shape[1]

    def slope(self) -> float:
        """The least-squares slope of ``e`` on ``o`` (with an intercept, as PTQD regresses)."""
        n = self.count
        var_o = self.oo / n - (self.o_sum / n) ** 2
        return (self.eo / n - (self.e_sum / n) * (self.o_sum / n)) / var_o if var_o > 0 else 0.0

    def pearson(self, e_shift: float = 0.0) -> float:
        """Correlation of ``e - e_shift * o`` with ``o`` (over all elements)."""
        n = self.count
        eo = self.eo - e_shift * self.oo
        ee = self.ee - 2 * e_shift * self.eo + e_shift ** 2 * self.oo
        es = self.e_sum - e_shift * self.o_sum
        cov = eo / n - (es / n) * (self.o_sum / n)
        var_e = ee / n - (es / n) ** 2
        var_o = self.oo / n - (self.o_sum / n) ** 2
        return cov / max(var_e * var_o, 1e-300) ** 0.5


@torch.no_grad()
def output_errors(denoiser, calib, batch_size: int, device="cpu", progress: bool = True) -> list[_Moments]:
    """Per step, the moments of the quantized denoiser's output error on the FP trajectories'
    own inputs (``denoiser(x_i) - outs_i`` over every calibration trajectory)."""
    n, s = calib.num_samples, calib.num_steps
    moments = [_Moments() for _ in range(s)]
    with progress_bar(s * -(-n // batch_size), "correction statistics", disable=not progress) as bar:
        for i in range(s):
            for start in range(0, n, batch_size):
                idx = torch.arange(start, min(n, start + batch_size))
                x = calib.xs[idx, i].to(device)
                o = calib.outs[idx, i].float()
                out = denoiser(x, calib.timesteps[i].to(device), calib.cond.index(idx).to(device)).float().cpu()
                moments[i].add(out - o, o)
                bar.update(1)
    return moments


@register_correction
class PTQD(Correction):
    """PTQD's correction (see the module docstring): per step ``k``, per-channel ``bias`` and
    the residual's ``variance``."""

    NAME = "ptqd"

    @classmethod
    def estimate(cls, denoiser, solver, calib, batch_size: int, device="cpu", progress: bool = True,
                 reference=None) -> "PTQD":
        moments = output_errors(denoiser, calib, batch_size, device, progress)
        k, bias, var, before, after, slopes = [], [], [], [], [], []
        for m in moments:
            slopes.append(round(m.slope(), 5))
            kk = max(slopes[-1], K_FLOOR)
            mu = (m.e_c - kk * m.o_c) / m.n_c
            rr = m.ee - 2 * kk * m.eo + kk * kk * m.oo  # sum of the residual's squares
            k.append(kk)
            bias.append(mu)
            var.append(max(rr - float((mu * mu).sum()) * m.n_c, 0.0) / m.count)
            before.append(round(m.pearson(), 4))
            after.append(round(m.pearson(kk), 4))
        stats = {"k": torch.tensor(k, dtype=torch.float32), "bias": torch.stack(bias).float(),
                 "variance": torch.tensor(var, dtype=torch.float32)}
        # the error's correlation with the FP output before and after the correlated part is removed
        return cls(calib.timesteps.float().clone(), stats, {"correlation_before": before, "correlation_after": after,
                                                             "slope": slopes})

    def output(self, stats, x, out):
        o = out.float()
        return ((o - _channel_view(stats["bias"], o).to(o.device)) / (1 + float(stats["k"]))).to(out.dtype)

    def noise_factor(self, stats, solver, i):
        coupling = getattr(solver, "output_noise", None)
        if coupling is None:
            return 1.0
        c, sigma = coupling(i)
        if sigma <= 0:
            return 1.0
        passed = c * c * float(stats["variance"]) / (1 + float(stats["k"])) ** 2
        return max(sigma * sigma - passed, 0.0) ** 0.5 / sigma


@register_correction
class TAC(Correction):
    """TAC-Diffusion's correction as we read it (see the module docstring): per step a
    per-channel ``scale`` of the output and a per-channel ``input_bias`` of the sample."""

    NAME = "tac"
    #: weight of the pull of each scale towards 1, per element (the loss's ``lambda_2``)
    PULL = 0.1

    @classmethod
    def estimate(cls, denoiser, solver, calib, batch_size: int, device="cpu", progress: bool = True,
                 reference=None) -> "TAC":
        scales = []
        for m in output_errors(denoiser, calib, batch_size, device, progress):
            # min over K of sum (K q - o)^2 + PULL n (K - 1)^2, q = e + o the quantized output
            qo, qq = m.eo_c + m.oo_c, m.ee_c + 2 * m.eo_c + m.oo_c
            scales.append((qo + cls.PULL * m.n_c) / (qq + cls.PULL * m.n_c))
        scale = torch.stack(scales).float()
        corr = cls(calib.timesteps.float().clone(), {"scale": scale, "input_bias": torch.zeros_like(scale)})
        corr.stats["input_bias"], drift = _input_drift(denoiser, solver, corr, calib, batch_size, device, progress)
        corr.log = {"drift_before": drift}
        return corr

    def output(self, stats, x, out):
        return (out.float() * _channel_view(stats["scale"], out).to(out.device)).to(out.dtype)

    def next_sample(self, stats, x):
        return (x.float() - _channel_view(stats["input_bias"], x).to(x.device)).to(x.dtype)


@torch.no_grad()
def _input_drift(denoiser, solver, corr: Correction, calib, batch_size: int, device, progress: bool):
    """Run the calibration noises through the quantized model with ``corr`` (its input bias
    filled in step by step); the per-channel mean drift of every step's sample from the FP
    trajectory's (``S, C``: row ``i`` for the sample entering step ``i``, row 0 zero), and
    the drift's size before its removal, per step."""
    n, steps = calib.num_samples, calib.num_steps
    stats = [corr.at(t) for t in calib.timesteps]  # views: the output's scale as it is now
    bias = corr.stats["input_bias"]
    xs = calib.xs[:, 0].float().clone()
    states = [solver.init_state() for _ in range(0, n, batch_size)]
    size = []
    gen = torch.Generator().manual_seed(0)
    with progress_bar(steps * len(states), "input drift", disable=not progress) as bar:
        for i in range(steps):
            for b, start in enumerate(range(0, n, batch_size)):
                idx = torch.arange(start, min(n, start + batch_size))
                x = xs[idx].to(device)
                out = denoiser(x, calib.timesteps[i].to(device), calib.cond.index(idx).to(device))
                x, states[b] = solver.step(i, x, corr.output(stats[i], x, out), states[b], gen)
                xs[idx] = x.float().cpu()
                bar.update(1)
            if i + 1 < steps:
                d = xs - calib.xs[:, i + 1].float()
                size.append(round(float(d.flatten(1).norm(dim=1).mean()), 5))
                bias[i + 1] = d.mean([k for k in range(d.dim()) if k != 1])
                xs -= _channel_view(bias[i + 1], xs)
    return bias, size


@register_correction
class QNCD(Correction):
    """QNCD's inter-step correction, estimated once (see the module docstring): per step one
    ``mean`` quantization noise of the output, subtracted."""

    NAME = "qncd"

    @classmethod
    @torch.no_grad()
    def estimate(cls, denoiser, solver, calib, batch_size: int, device="cpu", progress: bool = True,
                 reference=None) -> "QNCD":
        n, steps = calib.num_samples, calib.num_steps
        gen = torch.Generator().manual_seed(0)
        means = []
        with progress_bar(steps * -(-n // batch_size), "noise error", disable=not progress) as bar:
            for i in range(steps):
                total, count = 0.0, 0
                for start in range(0, n, batch_size):
                    idx = torch.arange(start, min(n, start + batch_size))
                    x0 = calib.xs[idx, -1].float()
                    x, _ = solver.renoise(i, x0, torch.randn(x0.shape, generator=gen))
                    args = (x.to(device), calib.timesteps[i].to(device), calib.cond.index(idx).to(device))
                    out = denoiser(*args).float() - reference(*args).float()
                    total += float(out.double().sum())
                    count += out.numel()
                    bar.update(1)
                means.append(total / count)
        return cls(calib.timesteps.float().clone(), {"mean": torch.tensor(means, dtype=torch.float32)})

    def output(self, stats, x, out):
        return (out.float() - float(stats["mean"])).to(out.dtype)


class CorrectedSolver:
    """A solver whose step corrects the model output first (and scales the noise a
    stochastic sampler adds); everything else is the wrapped solver's."""

    def __init__(self, solver, correction: Correction):
        self.inner, self.correction = solver, correction
        self._stats = [correction.at(t) for t in solver.timesteps]

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def output(self, i: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.correction.output(self._stats[i], x, out)

    def step(self, i, x, out, state, generator=None):
        out = self.output(i, x, out)
        factor = self.correction.noise_factor(self._stats[i], self.inner, i)
        if factor != 1.0:
            x, state = self.inner.step(i, x, out, state, generator, noise_factor=factor)
        else:
            x, state = self.inner.step(i, x, out, state, generator)
        if i + 1 < self.inner.num_steps:  # the next model input (the final sample is no input)
            x = self.correction.next_sample(self._stats[i + 1], x)
        return x, state

    def describe(self) -> dict:
        return {**self.inner.describe(), "correction": self.correction.NAME}
