"""AccuQuant's multistep objective and its three gradient modes."""

import diffusers
import pytest
import torch

import accuquant as aq
from accuquant.quant.layers import all_quantizers
from accuquant.calibrate.loop import calibrate
from accuquant.calibrate.protocol import Method, Run
from accuquant.methods.naive import Naive, NaiveConfig
from accuquant.calibrate.multistep import multistep_backward
from conftest import class_pipeline


def _setup(scheduler="ddim", steps=6, num=4, clip_sample=True):
    """A guided class-conditional model at W4A8 with naive ranges, its FP trajectories."""
    pipe = class_pipeline()
    den = pipe.denoiser()
    solver = aq.make_solver(scheduler, dict(diffusers.DDIMScheduler(clip_sample=clip_sample).config), steps)
    calib = aq.collect_trajectories(den, solver, num, cond=pipe.conditions(num), progress=False)
    cfg = aq.QuantConfig(weight_bits=4, act_bits=8)
    pipe.denoiser().wrap(cfg)
    calibrate(Run(den, solver, calib, cfg, progress=False), Naive(NaiveConfig()))
    params = {n: q.scale for n, q in all_quantizers(pipe.model).items()}
    for p in pipe.model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    return den, solver, calib, params


def _grads(den, solver, calib, params, start, m, mode):
    for p in params.values():
        p.grad = None
    x = calib.xs[:, start]
    state = solver.state_at(start, calib.xs, calib.outs)
    loss = multistep_backward(den, solver, x, state, start, m, calib.cond, calib.xs[:, start + m], mode)
    g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params.values()])
    return loss, g


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "dpm++"])
def test_checkpoint_gradient_equals_exact_for_every_group_size(scheduler):
    den, solver, calib, params = _setup(scheduler)
    for start, m in [(0, 1), (1, 2), (2, 4)]:
        l_e, g_e = _grads(den, solver, calib, params, start, m, "exact")
        l_c, g_c = _grads(den, solver, calib, params, start, m, "checkpoint")
        assert l_c == pytest.approx(l_e, rel=1e-5)
        assert g_e.abs().max() > 0
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6 * g_e.abs().max().item())


def test_approx_equals_exact_at_one_step_and_is_pinned_beyond():
    den, solver, calib, params = _setup()
    l_e, g_e = _grads(den, solver, calib, params, 2, 1, "exact")
    l_a, g_a = _grads(den, solver, calib, params, 2, 1, "approx")
    assert l_a == pytest.approx(l_e, rel=1e-6)
    torch.testing.assert_close(g_a, g_e, rtol=1e-4, atol=1e-6 * g_e.abs().max().item())
    # M > 1: the approximation copies dL/dx~_M to every intermediate output, ignoring how
    # each step's input moves the later steps. On this tiny untrained model (DDIM, 6 steps,
    # W4A8, guidance 2, groups from step 0) the cosine similarity with the exact gradient
    # measured 0.88 at M = 2 and 0.28 at M = 4 (torch 2.13, diffusers 0.42): a descent
    # direction, increasingly biased.
    cos = {}
    for m in (2, 4):
        _, g_e = _grads(den, solver, calib, params, 0, m, "exact")
        _, g_a = _grads(den, solver, calib, params, 0, m, "approx")
        cos[m] = torch.nn.functional.cosine_similarity(g_a, g_e, dim=0).item()
    assert 0.8 < cos[2] < 0.99 and 0.2 < cos[4] < cos[2], cos


def test_one_step_objective_is_the_per_step_objective_at_the_network_output():
    """M = 1 from FP inputs: x~_{i+1} - x_{i+1} = b_i (eps~ - eps) for DDIM, so the loss and its
    gradient are the per-step output loss scaled by b_i^2 (x0 clipping off: it makes the step
    nonlinear in eps)."""
    den, solver, calib, params = _setup(clip_sample=False)
    i = 3
    loss, g = _grads(den, solver, calib, params, i, 1, "exact")
    # b_i: DDIM's coefficient of the model output in x_{i+1}
    zero = solver.step(i, torch.zeros(1), torch.ones(1), ())[0].item()
    b = zero
    for p in params.values():
        p.grad = None
    out = den(calib.xs[:, i], solver.timesteps[i], calib.cond)
    ref = (out - calib.outs[:, i]).pow(2).mean()
    (ref * b**2).backward()
    g_ref = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params.values()])
    assert loss == pytest.approx(ref.item() * b**2, rel=1e-4)
    # float32 sums taken in another order: differences of about 1e-5 of the largest entry
    torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-4 * g_ref.abs().max().item())


# ---------------------------------------------------------------------------- the method
def _accuquant(**kw):
    opts = dict(init="naive", iters=15, group_size=2, traj_batch=2, save_every=5, lr=1e-2)
    opts.update(kw)
    return aq.quantize(class_pipeline(), aq.QuantConfig(weight_bits=4, act_bits=8), "accuquant", steps=4,
                       calib_samples=6, progress=False, **opts)


def _scales(q):
    return {n: t.scale.detach().clone() for n, t in all_quantizers(q.model).items()}


def test_accuquant_lowers_its_loss_and_the_trajectory_error():
    fp = class_pipeline()
    naive = aq.quantize(fp, aq.QuantConfig(weight_bits=4, act_bits=8), "naive", steps=4, calib_samples=6, progress=False)
    q = _accuquant(iters=40, traj_batch=4)
    curve = q.quant.method_log["loss_curve"]
    assert len(curve) == 4 and curve[-1] < curve[0], curve
    ev = q.quant.method_log["evaluations"]
    assert ev["backward"] == 40 * 4 * 2 * 2 and ev["forward"] == 2 * ev["backward"]  # checkpoint: 2 forwards
    ref = fp.sample(8, seed=5, steps=4, progress=False)
    err = {k: (m.sample(8, seed=5, steps=4, progress=False) - ref).norm().item() for k, m in
           (("naive", naive), ("accuquant", q))}
    assert err["accuquant"] < err["naive"], err


def _codes(q):
    from accuquant.quant.layers import quant_layers

    return {n: l.int_codes().clone() for n, l in quant_layers(q.model).items() if l.frozen}


def _interrupted_then_resumed(monkeypatch, **opts):
    """A run interrupted (Ctrl-C) at its 8th optimisation step, then the same run with
    ``resume=True``, which continues from the checkpoint after step 5."""
    import accuquant.methods.accuquant as mod

    real, calls = mod.multistep_backward, []

    def interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mod, "multistep_backward", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _accuquant(**opts)
    monkeypatch.setattr(mod, "multistep_backward", real)
    resumed = _accuquant(resume=True, **opts)
    assert resumed.quant.method_log["resumed_at"]["iteration"] == 5
    return resumed


@pytest.mark.slow  # a whole calibration run, twice
@pytest.mark.parametrize("rounding", ["keep", "learn"])
def test_accuquant_resumes_to_the_same_result(monkeypatch, rounding):
    full = _accuquant(rounding=rounding)
    resumed = _interrupted_then_resumed(monkeypatch, rounding=rounding)
    a, b = _scales(full), _scales(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = _codes(full), _codes(resumed)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # a whole calibration run, twice
def test_accuquant_keeps_a_learned_rounding_as_fixed_codes(monkeypatch):
    """With init="per-step" and rounding="keep", the saved codes are exactly the init's while
    the step sizes move (also across an interruption and a resume). The stand-in per-step
    gives hard learned rounding decisions at random, so they are not round-to-nearest."""
    from accuquant.quant.layers import quant_layers
    from accuquant.methods import naive, per_step, registry

    init_codes = {}

    class FakePerStep(Method):
        Config = per_step.PerStepConfig

        def initialise(self, ctx):
            naive.Naive(NaiveConfig()).initialise(ctx)
            g = torch.Generator().manual_seed(1)
            for name, layer in quant_layers(ctx.denoiser.model).items():
                parts = layer.weight_parts()
                for q, p in parts:
                    if q.enabled:
                        q.enable_learned_rounding(p.detach())
                        q.alpha.data = torch.where(torch.rand(p.shape, generator=g) < 0.5, -2.0, 2.0)
                        q.soft_rounding = False
                if layer.weight_quant:
                    init_codes[name] = torch.cat([q.to_int(p) - q.qmin for q, p in parts], 1).to(torch.uint8)

    monkeypatch.setitem(registry.METHODS, "per-step", FakePerStep)
    opts = dict(init="per-step", lr=3e-2, use_cache=False)
    full = _accuquant(**opts)
    first = dict(init_codes)
    a = _codes(full)
    assert a.keys() == first.keys() and all(torch.equal(a[k], first[k]) for k in a)
    resumed = _interrupted_then_resumed(monkeypatch, **opts)
    b = _codes(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = _scales(full), _scales(resumed)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the weight step sizes did move (by more than float noise), so the codes had a reason to change
    start = aq.quantize(class_pipeline(), aq.QuantConfig(weight_bits=4, act_bits=8), "naive", steps=4,
                        calib_samples=6, progress=False, use_cache=False)
    moved = [float((sa[k] / v - 1).abs().max()) for k, v in _scales(start).items() if "weight_quant" in k]
    assert max(moved) > 0.05, max(moved)


@pytest.mark.slow  # a whole calibration run, twice
def test_accuquant_learns_the_rounding_jointly_when_asked():
    """rounding="learn": AdaRound variables are learned with the step sizes (from the
    naive init: from the weights' fractional parts), the loss goes down, and the saved
    model rounds some weights differently from round-to-nearest."""
    naive = aq.quantize(class_pipeline(), aq.QuantConfig(weight_bits=4, act_bits=8), "naive", steps=4, calib_samples=6,
                        progress=False)
    q = _accuquant(iters=40, traj_batch=4, rounding="learn", round_lr=5e-2)
    curve = q.quant.method_log["loss_curve"]
    assert curve[-1] < curve[0], curve
    a, b = _codes(naive), _codes(q)
    changed = sum(int((a[k] != b[k]).sum()) for k in a)
    total = sum(a[k].numel() for k in a)
    assert 0 < changed < total // 2, (changed, total)
    stats = q.quant.method_log["rounding"]
    assert 0 < stats["changed"] < 0.5 and 0 <= stats["undecided_before_hardening"] <= 1, stats
    # the scales moved too, so both kinds of parameter were learned
    assert any(not torch.equal(x, y) for x, y in zip(_scales(naive).values(), _scales(q).values()))


def test_accuquant_options_are_checked_first():
    with pytest.raises(aq.AccuQuantError, match="grad"):
        _accuquant(grad="magic")
    with pytest.raises(aq.AccuQuantError, match="init"):
        _accuquant(init="accuquant")
    with pytest.raises(aq.AccuQuantError, match="rounding"):
        _accuquant(rounding="random")


def test_accuquant_on_a_text_conditioned_unet_via_the_api():
    """Guided text-conditioned steps (both branches, prompt embeddings) are simulated."""
    from conftest import text_conditions, tiny_cond_unet

    fp = aq.Pipeline(tiny_cond_unet(), dict(diffusers.DDIMScheduler(clip_sample=False).config),
                     defaults=aq.SamplingDefaults(3.0))
    solver = aq.make_solver("ddim", fp.scheduler_config, 4)
    calib = aq.collect_trajectories(fp.denoiser(), solver, 6, cond=text_conditions(6), progress=False)
    cfg = aq.QuantConfig(weight_bits=4, act_bits=8)
    q = aq.quantize(fp, cfg, "accuquant", calib=calib, steps=4, progress=False, init="naive", iters=40,
                    group_size=2, traj_batch=6, lr=1e-2)
    log = q.quant.method_log
    assert [tuple(g) for g in log["groups"]] == [(0, 2), (2, 2)]
    assert log["loss_curve"][-1] < log["loss_curve"][0], log["loss_curve"]


def test_the_init_method_result_is_cached_and_shared():
    """A method run with its default options leaves its result in the cache; AccuQuant's
    initialisation with the same model, bits, data and seed starts from it."""
    cfg = aq.QuantConfig(weight_bits=4, act_bits=8)
    naive = aq.quantize(class_pipeline(), cfg, "naive", steps=4, calib_samples=6, progress=False)
    q = aq.quantize(class_pipeline(), cfg, "accuquant", steps=4, calib_samples=6, progress=False, init="naive",
                    iters=0)
    assert q.quant.method_log["init"]["cached"] is True
    a, b = _scales(naive), _scales(q)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = aq.quantize(class_pipeline(), cfg, "accuquant", steps=4, calib_samples=6, progress=False, init="naive",
                        iters=0, use_cache=False)
    assert "cached" not in fresh.quant.method_log["init"]
    assert all(torch.equal(a[k], v) for k, v in _scales(fresh).items())


def test_a_default_run_is_served_from_the_result_cache_and_per_step_keeps_naive_s():
    """Per-step starts from naive's ranges and leaves them cached as naive's result, so the
    naive method on the same model, bits, data and seed then costs nothing and gives the
    same model as a fresh naive run; options other than the defaults always run."""
    cfg = aq.QuantConfig(weight_bits=4, act_bits=8)
    kw = dict(steps=4, calib_samples=6, progress=False)
    per_step = aq.quantize(class_pipeline(), cfg, "per-step", iters=2, act_iters=0, **kw)  # runs naive
    assert "cached" not in per_step.quant.method_log["init"]
    naive = aq.quantize(class_pipeline(), cfg, "naive", **kw)
    assert naive.quant.method_log["cached"] is True
    fresh = aq.quantize(class_pipeline(), cfg, "naive", use_cache=False, **kw)
    assert "cached" not in fresh.quant.method_log
    a, b = _scales(naive), _scales(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = aq.quantize(class_pipeline(), cfg, "per-step", iters=2, act_iters=0, **kw)
    assert again.quant.method_log["init"]["cached"] is True and "cached" not in again.quant.method_log


def test_accuquant_s_per_step_start_takes_its_own_options_and_is_cached_under_them():
    from accuquant.cache import result_key
    from accuquant.methods.per_step import PerStepConfig

    cfg = aq.QuantConfig(weight_bits=4, act_bits=8)
    kw = dict(steps=4, calib_samples=6, progress=False, iters=0, init_iters=3, init_act_iters=2, init_samples=2)
    first = aq.quantize(class_pipeline(), cfg, "accuquant", **kw)
    init = first.quant.method_log["init"]
    assert init["method"] == "per-step" and "cached" not in init and init["points"] == 2 * 4  # 2 per step
    block = next(iter(init["blocks"].values()))
    assert block["rows"] == 2 * 2 * 4  # both guidance branches
    again = aq.quantize(class_pipeline(), cfg, "accuquant", **kw)
    assert again.quant.method_log["init"]["cached"] is True
    a, b = _scales(first), _scales(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the defaults' entry (shared with `--method per-step`) is another one
    assert result_key("base", PerStepConfig()) != result_key("base", PerStepConfig(iters=3, act_iters=2,
                                                                                 samples_per_step=2))
    assert result_key("base", PerStepConfig()) == result_key("base", PerStepConfig(iters=300))


def test_a_new_method_version_neither_resumes_nor_reuses_older_results(monkeypatch):
    """The method's version is part of the run key (checkpoints) and of the result cache key."""
    from accuquant.cache import run_keys
    from accuquant.cache import result_key
    from accuquant.methods.per_step import PerStepConfig

    pipe = class_pipeline()
    solver = aq.make_solver("ddim", dict(diffusers.DDIMScheduler().config), 4)
    calib = aq.collect_trajectories(pipe.denoiser(), solver, 2, cond=pipe.conditions(2), progress=False)
    cfg = aq.QuantConfig(weight_bits=4, act_bits=8)

    def both(method_cfg):
        run_key, base_key = run_keys("fp", cfg.to_dict(), method_cfg.resume_dict(), calib.digest(), 0, 8, 1.0)
        return run_key, result_key(base_key, method_cfg)

    old = {"per-step": both(PerStepConfig()), "naive": both(NaiveConfig())}
    monkeypatch.setattr(PerStepConfig, "VERSION", PerStepConfig.VERSION + 1)
    new = both(PerStepConfig())
    assert new[0] != old["per-step"][0] and new[1] != old["per-step"][1]
    assert both(NaiveConfig()) == old["naive"]
