import diffusers
import pytest
import torch

import accuquant as aq
from accuquant.sampling import SOLVERS
from conftest import class_pipeline

W = torch.randn(3, 3, generator=torch.Generator().manual_seed(0)) * 0.5


def toy_model(x, t, cond=None):
    """A smooth stand-in for a denoiser whose output depends on x and t."""
    return torch.tanh(torch.einsum("bchw,cd->bdhw", x, W)) * (1 + float(t) / 1000)


CASES = [
    ("ddim", "DDIMScheduler", {}),
    ("pndm", "PNDMScheduler", {"skip_prk_steps": True}),
    ("dpm++", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    ("ddpm", "DDPMScheduler", {}),
]


@pytest.mark.parametrize("name, cls, extra", CASES)
@pytest.mark.parametrize("steps", [4, 20])
def test_solver_matches_the_diffusers_loop(name, cls, extra, steps):
    base = dict(diffusers.DDIMScheduler(beta_schedule="scaled_linear").config)
    solver = aq.make_solver(name, base, steps)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = aq.run_trajectory(toy_model, solver, noise, generator=torch.Generator().manual_seed(2))
    sched = getattr(diffusers, cls).from_config(base, **extra)
    sched.set_timesteps(steps)
    x, g = noise * sched.init_noise_sigma, torch.Generator().manual_seed(2)
    for t in sched.timesteps:
        kw = {"generator": g} if name == "ddpm" else {}
        x = sched.step(toy_model(x, t), t, x, **kw).prev_sample
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()


@pytest.mark.parametrize("name", ["ddim", "pndm", "dpm++"])
def test_step_resumes_from_any_point_of_a_stored_trajectory(name):
    solver = aq.make_solver(name, dict(diffusers.DDIMScheduler().config), 10)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    final, xs, outs = aq.run_trajectory(toy_model, solver, noise, keep=True)
    assert xs.shape[1] == solver.num_steps + 1 and torch.equal(xs[:, -1], final)
    for start in (0, 1, 2, 5, solver.num_steps - 1):
        state, x = solver.state_at(start, xs, outs), xs[:, start]
        for i in range(start, solver.num_steps):
            x, state = solver.step(i, x, toy_model(x, solver.timesteps[i]), state)
        assert torch.equal(x, final), (name, start)


@pytest.mark.parametrize("name", ["ddim", "pndm", "dpm++"])
def test_step_is_differentiable(name):
    solver = aq.make_solver(name, dict(diffusers.DDIMScheduler().config), 6)
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    state, y = solver.init_state(), x
    for i in range(3):
        y, state = solver.step(i, y, toy_model(y, solver.timesteps[i]), state)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_unknown_scheduler_is_refused():
    with pytest.raises(aq.AccuQuantError, match="unknown scheduler 'euler'"):
        aq.make_solver("euler", dict(diffusers.DDIMScheduler().config), 10)
    assert {"ddim", "ddpm", "pndm", "dpm++"} <= set(SOLVERS)


def test_classifier_free_guidance():
    pipe = class_pipeline()
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = aq.Conditions(labels=torch.tensor([0, 1, 2, 3]))
    with torch.no_grad():
        plain = pipe.denoiser(1.0)(x, 400, cond)
        uncond = pipe.denoiser(1.0)(x, 400, aq.Conditions(labels=torch.full((4,), 10)))
        guided = pipe.denoiser(3.0)(x, 400, cond)
    assert torch.allclose(guided, uncond + 3.0 * (plain - uncond), atol=1e-5)
    assert not torch.allclose(guided, plain, atol=1e-3)
    # the same seeds and labels give the same samples; other labels change them
    a = pipe.sample(4, seed=0, steps=4, progress=False)
    b = pipe.sample(4, seed=0, steps=4, progress=False, batch_size=3)
    c = pipe.sample(4, seed=0, steps=4, labels=[5], progress=False)
    # (batch size 3 vs 4 changes the order of float sums: about 1e-5 on samples of size 1)
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, c, atol=1e-3)


def test_guidance_without_an_unconditional_branch_is_refused():
    pipe = aq.Pipeline(class_pipeline().model, dict(diffusers.DDIMScheduler().config))
    with pytest.raises(aq.AccuQuantError, match="unconditional"):
        pipe.sample(2, steps=2, guidance_scale=2.0, labels=[1], progress=False)


FLOW = {"shift": 3.0}  # as Stable Diffusion 3's scheduler
FLOW_DYNAMIC = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}  # as FLUX's


@pytest.mark.parametrize("extra, mu", [(FLOW, None), (FLOW_DYNAMIC, 0.8)])
@pytest.mark.parametrize("steps", [4, 28])
def test_flow_euler_matches_the_diffusers_loop(extra, mu, steps):
    config = dict(diffusers.FlowMatchEulerDiscreteScheduler(**extra).config)
    solver = aq.make_solver("flow-euler", config, steps, **({} if mu is None else {"mu": mu}))
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ours, xs, outs = aq.run_trajectory(toy_model, solver, noise, keep=True)
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(steps, **({} if mu is None else {"mu": mu}))
    x = noise
    for t in sched.timesteps:
        x = sched.step(toy_model(x, t), t, x).prev_sample
    assert torch.equal(solver.timesteps, sched.timesteps)
    assert torch.allclose(ours, x, atol=1e-6), (ours - x).abs().max()
    # stateless: restarts from any stored point to the same end
    for start in (1, steps // 2, steps - 1):
        y, state = xs[:, start], solver.state_at(start, xs, outs)
        for i in range(start, steps):
            y, state = solver.step(i, y, toy_model(y, solver.timesteps[i]), state)
        assert torch.equal(y, ours)


def test_flow_euler_is_differentiable_and_predicts_x0():
    solver = aq.make_solver("flow-euler", dict(diffusers.FlowMatchEulerDiscreteScheduler(**FLOW).config), 6)
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    s = solver.sigmas[2]
    xt = (1 - s) * x0 + s * eps
    assert torch.allclose(solver.predicted_x0(2, xt, eps - x0), x0, atol=1e-5)  # the exact velocity gives x0
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    y, state = x, solver.init_state()
    for i in range(3):
        y, state = solver.step(i, y, toy_model(y, solver.timesteps[i]), state)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_flow_euler_refuses_what_it_cannot_reproduce():
    dyn = dict(diffusers.FlowMatchEulerDiscreteScheduler(**FLOW_DYNAMIC).config)
    with pytest.raises(aq.AccuQuantError, match="must give mu"):
        aq.make_solver("flow-euler", dyn, 10)
    stoch = dict(diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True).config)
    with pytest.raises(aq.AccuQuantError, match="stochastic_sampling"):
        aq.make_solver("flow-euler", stoch, 10)
