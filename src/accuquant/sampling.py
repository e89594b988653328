"""Samplers as one step function: ``x_next, state = solver.step(i, x, out, state)``.

A :class:`Solver` advances a latent by one step of a diffusers scheduler. It is
functional: everything a multistep method remembers (earlier model outputs) travels in
``state``, a tuple of tensors, so the same step serves plain sampling, calibration-data
collection, and AccuQuant's simulation, which starts at any step of a stored trajectory
(:meth:`Solver.state_at` rebuilds the state there from the stored full-precision
outputs) and differentiates through the step.

Supported: DDIM and DDPM (diffusers' own ``step``, which keeps no state), PNDM in its
PLMS form and DPM-Solver++ (2M), whose multistep updates are written out here from
the schedulers' tables and checked against diffusers' own loops in the tests, and the
Euler step of flow matching (``FlowMatchEulerDiscreteScheduler``, as Stable Diffusion 3
and FLUX sample), also written out.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import AccuQuantError

State = tuple


class Solver:
    """Base class. ``timesteps[i]`` is the model timestep of step ``i``; there are
    ``num_steps`` model evaluations, and step ``i`` maps ``x_i`` to ``x_{i+1}``."""

    name = "base"
    scheduler_class = ""
    overrides: dict = {}
    stochastic = False

    def __init__(self, scheduler_config: dict, num_steps: int, **timestep_kwargs):
        import diffusers

        # As diffusers users switch schedulers: keys the source left at their defaults
        # (``_use_default_values``) take the target class's defaults.
        self.scheduler = getattr(diffusers, self.scheduler_class).from_config(dict(scheduler_config), **self.overrides)
        self.check_config(self.scheduler.config)
        if num_steps < 1 or num_steps > self.scheduler.config.num_train_timesteps:
            raise AccuQuantError(f"steps: {num_steps} is out of range (1 to {self.scheduler.config.num_train_timesteps})")
        self.scheduler.set_timesteps(num_steps, **timestep_kwargs)
        self.timesteps = self.scheduler.timesteps.clone()
        self.requested_steps = num_steps

    def check_config(self, config) -> None:
        pass

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def init_noise_sigma(self) -> float:
        return float(self.scheduler.init_noise_sigma)

    def init_state(self) -> State:
        return ()

    def state_at(self, i: int, xs: torch.Tensor, outs: torch.Tensor) -> State:
        """The state before step ``i`` of a trajectory whose samples are ``xs[:, j]`` and
        model outputs ``outs[:, j]`` (``j < i`` is used)."""
        return ()

    def step(self, i: int, x: torch.Tensor, out: torch.Tensor, state: State, generator=None) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    def output(self, i: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The model output step ``i`` uses (a sampling correction's changes it:
        :class:`~accuquant.methods.corrections.CorrectedSolver`)."""
        return out

    def predicted_x0(self, i: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The clean sample the model output at step ``i`` predicts from ``x``."""
        sched = self.scheduler
        a = sched.alphas_cumprod[int(self.timesteps[i])].to(x.dtype)
        pt = sched.config.prediction_type
        if pt == "epsilon":
            return (x - (1 - a).sqrt() * out) / a.sqrt()
        if pt == "v_prediction":
            return a.sqrt() * x - (1 - a).sqrt() * out
        return out

    def renoise(self, i: int, x0: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample at step ``i`` made from the clean ``x0`` and ``noise`` as training does,
        and the output a perfect model would give there (noise, velocity or clean sample)."""
        sched = self.scheduler
        a = sched.alphas_cumprod[int(self.timesteps[i])].to(x0.dtype)
        x = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pt = sched.config.prediction_type
        if pt == "epsilon":
            return x, noise
        if pt == "v_prediction":
            return x, a.sqrt() * noise - (1 - a).sqrt() * x0
        return x, x0

    def describe(self) -> dict:
        return {"solver": self.name, "steps": self.requested_steps, "scheduler_config": dict(self.scheduler.config)}


class DDIMSolver(Solver):
    """DDIM (Song et al., 2021), deterministic (eta = 0)."""

    name = "ddim"
    scheduler_class = "DDIMScheduler"

    def step(self, i, x, out, state, generator=None):
        return self.scheduler.step(out, self.timesteps[i], x, eta=0.0).prev_sample, state


class DDPMSolver(Solver):
    """DDPM ancestral sampling (Ho et al., 2020); stochastic."""

    name = "ddpm"
    scheduler_class = "DDPMScheduler"
    stochastic = True

    def step(self, i, x, out, state, generator=None, noise_factor: float = 1.0):
        """``noise_factor`` scales the noise the step adds (a sampling correction's variance
        calibration); the same noise is drawn either way."""
        res = self.scheduler.step(out, self.timesteps[i], x, generator=generator)
        if noise_factor == 1.0:
            return res.prev_sample, state
        c_x0, c_x, _ = self._coefficients(i)
        mean = c_x0 * res.pred_original_sample + c_x * x
        return (mean + noise_factor * (res.prev_sample - mean)).to(out.dtype), state

    def _coefficients(self, i: int) -> tuple[float, float, float]:
        """The posterior's coefficients at step ``i``, as diffusers' step computes them: on the
        predicted clean sample, on ``x``, and its variance (``fixed_small``)."""
        s = self.scheduler
        t = int(self.timesteps[i])
        prev = int(s.previous_timestep(t))
        a = float(s.alphas_cumprod[t])
        a_prev = float(s.alphas_cumprod[prev]) if prev >= 0 else float(s.one)
        alpha = a / a_prev
        return ((a_prev ** 0.5) * (1 - alpha) / (1 - a), alpha ** 0.5 * (1 - a_prev) / (1 - a),
                max((1 - a_prev) / (1 - a) * (1 - alpha), 1e-20))

    def output_noise(self, i: int) -> tuple[float, float]:
        """How an error in the model output reaches ``x_{i+1}`` (its factor, through the
        predicted clean sample) and the standard deviation of the noise the step adds (0 at
        timestep 0, or for a variance type other than ``fixed_small``)."""
        c_x0, _, var = self._coefficients(i)
        zero = torch.zeros(())
        dx0 = float(self.predicted_x0(i, zero, torch.ones(())) - self.predicted_x0(i, zero, zero))
        noiseless = int(self.timesteps[i]) == 0 or self.scheduler.config.variance_type != "fixed_small"
        sigma = 0.0 if noiseless else var ** 0.5
        return abs(c_x0 * dx0), sigma


class PLMSSolver(Solver):
    """PNDM's pseudo linear multistep method (PLMS; Liu et al., 2022), as diffusers'
    ``PNDMScheduler`` with ``skip_prk_steps``: the first step is evaluated twice
    (a Heun-like start), then Adams-Bashforth of up to fourth order on the noise."""

    name = "pndm"
    scheduler_class = "PNDMScheduler"
    overrides = {"skip_prk_steps": True}

    def check_config(self, config):
        if config.prediction_type not in ("epsilon", "v_prediction"):
            raise AccuQuantError(f"pndm: prediction_type {config.prediction_type!r} is not supported")

    def _prev(self, x, t, t_prev, eps):
        s = self.scheduler
        a_t = s.alphas_cumprod[t]
        a_prev = s.alphas_cumprod[t_prev] if t_prev >= 0 else s.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if s.config.prediction_type == "v_prediction":
            eps = a_t**0.5 * eps + b_t**0.5 * x
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denom

    def init_state(self):
        return ((), None)

    def state_at(self, i, xs, outs):
        ets = tuple(outs[:, j] for j in range(i) if j != 1)[-3:]
        return (ets, xs[:, 0] if i == 1 else None)

    def step(self, i, x, out, state, generator=None):
        ets, cur = state
        ratio = self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps
        t = int(self.timesteps[i])
        t_prev = t - ratio
        if i != 1:
            ets = (ets[-3:] + (out,))
        else:
            t_prev, t = t, t + ratio
        if len(ets) == 1 and i == 0:
            eps, cur = out, x
        elif len(ets) == 1 and i == 1:
            eps, x, cur = (out + ets[-1]) / 2, cur, None
        elif len(ets) == 2:
            eps = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            eps = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            eps = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        return self._prev(x, t, t_prev, eps), (ets[-3:] if len(ets) > 3 else ets, cur)


class DPMSolverPP(Solver):
    """DPM-Solver++ (2M) (Lu et al., 2022), as diffusers' ``DPMSolverMultistepScheduler``
    with ``algorithm_type="dpmsolver++"``, ``solver_order=2`` and the midpoint rule;
    the state is the previous step's data prediction."""

    name = "dpm++"
    scheduler_class = "DPMSolverMultistepScheduler"
    overrides = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}

    def check_config(self, config):
        if config.thresholding:
            raise AccuQuantError("dpm++: thresholding is not supported")
        if config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise AccuQuantError(f"dpm++: prediction_type {config.prediction_type!r} is not supported")

    def _alpha_sigma(self, i):
        sigma = self.scheduler.sigmas[i]
        alpha = 1 / (sigma**2 + 1) ** 0.5
        return alpha, sigma * alpha

    def _x0(self, i, x, out):
        alpha, sigma = self._alpha_sigma(i)
        pt = self.scheduler.config.prediction_type
        if pt == "epsilon":
            return (x - sigma * out) / alpha
        if pt == "v_prediction":
            return alpha * x - sigma * out
        return out

    def init_state(self):
        return (None,)

    def state_at(self, i, xs, outs):
        return (self._x0(i - 1, xs[:, i - 1], outs[:, i - 1]) if i > 0 else None,)

    def step(self, i, x, out, state, generator=None):
        cfg = self.scheduler.config
        n = self.num_steps
        m0 = self._x0(i, x, out)
        (m1,) = state
        lower_final = i == n - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        alpha_s0, sigma_s0 = self._alpha_sigma(i)
        lam_t = torch.log(alpha_t) - torch.log(sigma_t)
        lam_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lam_t - lam_s0
        if m1 is None or lower_final:
            x_next = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * m0
        else:
            alpha_s1, sigma_s1 = self._alpha_sigma(i - 1)
            lam_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            r0 = (lam_s0 - lam_s1) / h
            d1 = (1.0 / r0) * (m0 - m1)
            x_next = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * m0 - 0.5 * (
                alpha_t * (torch.exp(-h) - 1.0)
            ) * d1
        return x_next.to(out.dtype), (m0,)


class FlowEulerSolver(Solver):
    """The Euler step of a flow-matching model (rectified flow: ``x_t = (1 - s) x_0 + s eps``,
    the model predicts the velocity ``eps - x_0``), as diffusers' ``FlowMatchEulerDiscreteScheduler``
    computes it: ``x_{i+1} = x_i + (s_{i+1} - s_i) v`` over the scheduler's sigmas (its
    ``shift``, or the dynamic shift ``mu`` a pipeline computes from the image size, passed as
    ``make_solver(..., mu=...)``). Stateless, so it restarts anywhere."""

    name = "flow-euler"
    scheduler_class = "FlowMatchEulerDiscreteScheduler"

    def __init__(self, scheduler_config: dict, num_steps: int, mu: float | None = None,
                 sigmas: list[float] | None = None):
        self._mu, self._sigmas = mu, sigmas
        config = dict(scheduler_config)
        if "FlowMatch" not in str(config.get("_class_name", "")) and "flow_shift" in config:
            # a multistep scheduler in flow mode (Sana, Wan) names its shift flow_shift
            config = {"shift": config["flow_shift"], **{k: v for k, v in config.items() if k != "_use_default_values"}}
        kw = {k: v for k, v in (("mu", mu), ("sigmas", sigmas)) if v is not None}
        super().__init__(config, num_steps, **kw)

    def check_config(self, config):
        if config.get("stochastic_sampling"):
            raise AccuQuantError("flow-euler: stochastic_sampling is not supported")
        if config.get("use_dynamic_shifting") and self._mu is None:
            raise AccuQuantError("flow-euler: this scheduler shifts its sigmas with the image size "
                                 "(use_dynamic_shifting); the pipeline must give mu")

    @property
    def sigmas(self) -> torch.Tensor:
        return self.scheduler.sigmas

    @property
    def init_noise_sigma(self) -> float:
        return 1.0  # sampling starts from the noise itself (sigma 1)

    def step(self, i, x, out, state, generator=None):
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return (x.to(torch.float32) + dt * out).to(out.dtype), state

    def predicted_x0(self, i, x, out):
        return x - self.sigmas[i].to(x.dtype) * out

    def renoise(self, i, x0, noise):
        s = self.sigmas[i].to(x0.dtype)
        return (1 - s) * x0 + s * noise, noise - x0

    def describe(self):
        return {**super().describe(), **{k: v for k, v in (("mu", self._mu), ("sigmas", self._sigmas)) if v is not None}}


SOLVERS: dict[str, type[Solver]] = {
    "ddim": DDIMSolver,
    "ddpm": DDPMSolver,
    "pndm": PLMSSolver,
    "plms": PLMSSolver,
    "dpm++": DPMSolverPP,
    "dpmsolver++": DPMSolverPP,
    "flow-euler": FlowEulerSolver,
}


def solver_class(name: str) -> type[Solver]:
    """The solver registered as ``name``; an unknown name is refused with the choices."""
    if name.lower() not in SOLVERS:
        raise AccuQuantError(f"unknown scheduler {name!r}; choose one of: {', '.join(SOLVERS)}")
    return SOLVERS[name.lower()]


def is_flow(scheduler_config: dict) -> bool:
    """Whether the scheduler samples a flow-matching model: a ``FlowMatch*`` scheduler, or a
    multistep one in its flow mode (Sana's DPM-Solver, Wan's UniPC)."""
    return ("FlowMatch" in str(scheduler_config.get("_class_name", ""))
            or scheduler_config.get("prediction_type") == "flow_prediction" or bool(scheduler_config.get("use_flow_sigmas")))


def default_solver(scheduler_config: dict) -> str:
    """The solver of a model when none is named: ``flow-euler`` for a flow-matching model
    (:func:`is_flow`), else ``ddim``."""
    return "flow-euler" if is_flow(scheduler_config) else "ddim"


def make_solver(name: str | None, scheduler_config: dict, num_steps: int, **kwargs) -> Solver:
    """The functional step (:class:`Solver`) of scheduler ``name`` (``ddim``, ``ddpm``, ``pndm``/``plms``,
    ``dpm++``, ``flow-euler``; ``None``: :func:`default_solver`) with ``num_steps`` steps, built
    from a diffusers scheduler config (``kwargs``: the solver's own, such as a flow model's ``mu``)."""
    cls = solver_class(name or default_solver(scheduler_config))
    try:
        return cls(scheduler_config, num_steps, **kwargs)
    except AccuQuantError:
        raise
    except Exception as e:  # a config with wrong types or values: diffusers raises many kinds
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AccuQuantError(f"scheduler config ({scheduler_config.get('_class_name', 'no class')}): cannot build "
                             f"the {cls.name} scheduler from it ({msg})") from None


def run_trajectory(
    denoiser: Callable,
    scheduler: Solver,
    noise: torch.Tensor,
    cond=None,
    *,
    keep: bool = False,
    generator: torch.Generator | None = None,
    callback: Callable[[int], None] | None = None,
):
    """Sample from ``noise`` with every step of ``scheduler``.

    Returns the final sample, and with ``keep=True`` also the stacked samples
    ``xs`` (``B, S+1, ...``; ``xs[:, 0]`` is the scaled noise) and model outputs
    ``outs`` (``B, S, ...``).
    """
    x = noise * scheduler.init_noise_sigma
    state = scheduler.init_state()
    xs, outs = [x], []
    for i in range(scheduler.num_steps):
        out = denoiser(x, scheduler.timesteps[i], cond)
        x, state = scheduler.step(i, x, out, state, generator)
        if keep:
            xs.append(x)
            outs.append(out)
        if callback is not None:
            callback(i)
    if keep:
        return x, torch.stack(xs, 1), torch.stack(outs, 1)
    return x
