"""Sampling corrections (PTQD): estimation, the sampler step, saving, the command line."""

import json

import diffusers
import pytest
import torch

import accuquant as aq
from accuquant.calibrate.data import Trajectories
from accuquant.methods.corrections import K_FLOOR, PTQD, QNCD, TAC, CorrectedSolver, Correction, split_method
from accuquant.models import Conditions
from accuquant.sampling import make_solver, run_trajectory
from conftest import class_pipeline

STEPS = 4


def _synthetic(num: int, seed: int, k: list[float], bias: list[list[float]], noise: float):
    """FP outputs ``o`` on random inputs, and a "quantized" denoiser returning
    ``(1 + k_i) o + bias_i + noise * z``: the error PTQD models, with known parts."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(num, STEPS + 1, 2, 6, 6, generator=g)
    outs = torch.tanh(xs[:, :STEPS] * 1.5)
    timesteps = torch.tensor([900, 600, 300, 0])
    calib = Trajectories(xs, outs, timesteps, Conditions(), {})

    def denoiser(x, t, cond):
        i = int((timesteps == t).nonzero())
        o = torch.tanh(x * 1.5)
        z = torch.randn(o.shape, generator=g)
        return (1 + k[i]) * o + torch.tensor(bias[i]).view(1, -1, 1, 1) + noise * z

    return calib, denoiser


def test_ptqd_recovers_the_correlated_part_and_the_bias_and_removes_the_correlation():
    k = [0.3, 0.1, -0.2, 0.05]  # a negative slope: the quantized output shrinks
    bias = [[0.2, -0.1], [0.0, 0.05], [0.1, 0.1], [-0.3, 0.0]]
    calib, den = _synthetic(64, 0, k, bias, noise=0.1)
    corr = PTQD.estimate(den, None, calib, batch_size=16, progress=False)
    est_k = corr.stats["k"]
    # k recovered, the bias per channel, the residual's variance
    assert torch.allclose(est_k, torch.tensor(k), atol=0.01)
    assert torch.allclose(corr.stats["bias"], torch.tensor(bias), atol=0.01)
    assert torch.allclose(corr.stats["variance"], torch.full((4,), 0.01), rtol=0.1)
    # on held-out trajectories the corrected error no longer correlates with the FP output
    held, den2 = _synthetic(64, 1, k, bias, noise=0.1)
    for i in (0, 1, 2):  # the steps with a strong correlated part
        o = held.outs[:, i]
        x = held.xs[:, i]
        out_q = den2(x, held.timesteps[i], None)
        fixed = corr.output(corr.at(held.timesteps[i]), x, out_q)
        before = torch.corrcoef(torch.stack([(out_q - o).flatten(), o.flatten()]))[0, 1]
        after = torch.corrcoef(torch.stack([(fixed - o).flatten(), o.flatten()]))[0, 1]
        assert abs(before) > 0.4 and abs(after) < 0.05, (i, before, after)
        # what is left is the uncorrelated noise, scaled by 1 / (1 + k)
        assert (fixed - o).pow(2).mean() == pytest.approx(0.01 / (1 + k[i]) ** 2, rel=0.15)
        assert (fixed - o).pow(2).mean() < 0.6 * (out_q - o).pow(2).mean()
    assert corr.log["correlation_before"][0] > 0.4 and abs(corr.log["correlation_after"][0]) < 0.02
    # a slope below the floor is not divided out in full
    calib, den = _synthetic(16, 2, [-0.8] * 4, [[0.0, 0.0]] * 4, noise=0.0)
    assert torch.allclose(PTQD.estimate(den, None, calib, 16, progress=False).stats["k"], torch.full((4,), K_FLOOR))


def test_statistics_are_read_by_timestep():
    c = PTQD(torch.tensor([900.0, 500.0, 100.0]), {"k": torch.tensor([0.1, 0.3, 0.5]),
                                                   "bias": torch.tensor([[1.0], [2.0], [3.0]]),
                                                   "variance": torch.zeros(3)})
    assert float(c.at(500)["k"]) == pytest.approx(0.3)
    assert float(c.at(700)["k"]) == pytest.approx(0.2)  # between two stored timesteps
    assert float(c.at(300)["bias"][0]) == pytest.approx(2.5)
    assert float(c.at(999)["k"]) == pytest.approx(0.1) and float(c.at(0)["k"]) == pytest.approx(0.5)
    back = Correction.from_dict(json.loads(json.dumps(c.to_dict())))
    assert all(torch.equal(back.stats[k], v) for k, v in c.stats.items())
    with pytest.raises(aq.AccuQuantError, match="upgrade accuquant"):
        Correction.from_dict({**c.to_dict(), "version": 99})
    with pytest.raises(aq.AccuQuantError, match="unknown correction"):
        Correction.from_dict({**c.to_dict(), "name": "nope"})


def test_method_names_compose_a_correction():
    assert split_method("accuquant+ptqd") == ("accuquant", "ptqd")
    assert split_method("ptqd") == ("per-step", "ptqd")
    assert split_method("naive", "ptqd") == ("naive", "ptqd")
    assert split_method("naive") == ("naive", None)
    with pytest.raises(aq.AccuQuantError, match="unknown correction 'nope'"):
        split_method("accuquant+nope")
    with pytest.raises(aq.AccuQuantError, match="unknown correction"):
        aq.quantize(class_pipeline(), method="naive", correct="nope")


@pytest.mark.parametrize("name", ["ptqd", "tac", "qncd"])
def test_a_corrected_model_samples_with_its_correction_on_every_backend_and_after_loading(tmp_path, name):
    q = aq.quantize(class_pipeline(channels=(16, 32)), aq.QuantConfig(weight_bits=4, act_bits=8), f"naive+{name}",
                    steps=STEPS, calib_samples=8, progress=False)
    assert q.quant.method == "naive" and q.quant.correction["name"] == name
    assert q.quant.label == f"naive+{name} W4A8" and len(q.quant.correction["timesteps"]) == STEPS
    assert isinstance(q.solver(), CorrectedSolver)
    x = q.sample(4, progress=False)
    plain = q.copy()
    plain.quant.correction = None
    assert not torch.equal(x, plain.sample(4, progress=False))  # the correction acts
    q.save(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "accuquant.json").read_text())
    assert saved["correction"]["name"] == name
    assert torch.equal(aq.load_pipeline(tmp_path / "q").sample(4, progress=False), x)
    int8 = aq.load_pipeline(tmp_path / "q", backend="int8")
    assert isinstance(int8.solver(), CorrectedSolver)
    int8_plain = aq.load_pipeline(tmp_path / "q", backend="int8")
    int8_plain.quant.correction = None
    y, y_plain = int8.sample(4, progress=False), int8_plain.sample(4, progress=False)
    assert not torch.equal(y, y_plain)
    assert torch.equal(aq.load_pipeline(tmp_path / "q", backend="int8").sample(4, progress=False), y)


def test_ddpm_variance_calibration_keeps_the_step_s_mean_and_shrinks_its_noise():
    solver = make_solver("ddpm", dict(diffusers.DDPMScheduler().config), 10)
    x, out = torch.randn(1, 1, 4, 4).expand(4000, -1, -1, -1), torch.randn(1, 1, 4, 4).expand(4000, -1, -1, -1)
    i = 3
    c, sigma = solver.output_noise(i)
    assert sigma > 0 and c > 0
    full, _ = solver.step(i, x, out, (), torch.Generator().manual_seed(0))
    half, _ = solver.step(i, x, out, (), torch.Generator().manual_seed(0), noise_factor=0.5)
    none, _ = solver.step(i, x, out, (), torch.Generator().manual_seed(1), noise_factor=0.0)
    assert torch.allclose(none.std(0), torch.zeros(()), atol=1e-6)  # no noise left
    assert torch.allclose(full.mean(0), none[0], atol=4 * sigma / 4000 ** 0.5)  # the same mean
    assert torch.allclose(half.std(0), 0.5 * full.std(0), rtol=1e-4)
    # PTQD's factor removes the variance the residual error passes on through the step
    corr = PTQD(solver.timesteps.float(), {"k": torch.zeros(10), "bias": torch.zeros(10, 1),
                                           "variance": torch.full((10,), 0.5 * sigma ** 2 / c ** 2)})
    f = corr.noise_factor(corr.at(solver.timesteps[i]), solver, i)
    assert f == pytest.approx(0.5 ** 0.5)
    wrapped = CorrectedSolver(solver, corr)
    a, _ = wrapped.step(i, x, out, (), torch.Generator().manual_seed(0))
    assert torch.allclose(a.std(0), f * full.std(0), rtol=1e-4)
    assert solver.output_noise(9)[1] == 0.0  # the last step (timestep 0) adds no noise


def test_the_command_line_takes_corrections_as_options_and_in_method_names(tiny_pipeline_dir, tmp_path, capsys):
    from accuquant.cli import main

    def quantize(out, *extra):
        capsys.readouterr()
        code = main(["quantize", "--model", str(tiny_pipeline_dir), "--weight-bits", "4", "--act-bits", "8",
                     "--steps", "3", "--scheduler", "ddim", "--calib-samples", "4", "--out", str(tmp_path / out),
                     "--quiet", *extra])
        return code, capsys.readouterr()

    code, (out, err) = quantize("ptqd", "--method", "ptqd", "--iters", "2", "--act-iters", "1")  # per-step's flags
    assert code == 0, err
    meta = json.loads((tmp_path / "ptqd" / "accuquant.json").read_text())
    assert meta["method"] == "per-step" and meta["method_config"]["iters"] == 2
    assert meta["correction"]["name"] == "ptqd" and len(meta["correction"]["timesteps"]) == 3
    for name, extra in (("plus", ["--method", "naive+ptqd"]), ("flag", ["--method", "naive", "--correct", "ptqd"])):
        code, (out, err) = quantize(name, *extra)
        assert code == 0, err
        meta = json.loads((tmp_path / name / "accuquant.json").read_text())
        assert meta["method"] == "naive" and meta["correction"]["name"] == "ptqd"
    for extra, message in ((["--method", "naive+nope"], "unknown correction 'nope'"),
                           (["--method", "naive", "--correct", "nope"], "invalid choice: 'nope'"),
                           (["--method", "ptqd", "--calib-samples", "0"], "calib-samples")):
        code, (out, err) = quantize("bad", *extra)
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "bad").exists()


def _linear_trajectories(num: int, seed: int, solver):
    """FP trajectories of a linear "denoiser" ``0.5 x`` with the given solver."""
    def fp(x, t, cond):
        return 0.5 * x

    noise = torch.randn(num, 2, 6, 6, generator=torch.Generator().manual_seed(seed))
    _, xs, outs = run_trajectory(fp, solver, noise, keep=True)
    return Trajectories(xs, outs, solver.timesteps, Conditions(), {})


def test_tac_scales_each_channel_by_its_least_squares_factor_and_removes_the_input_drift():
    solver = make_solver("ddim", dict(diffusers.DDIMScheduler().config), STEPS)
    calib = _linear_trajectories(32, 0, solver)
    shift = torch.tensor([0.3, -0.2]).view(1, 2, 1, 1)

    def quantized(x, t, cond):  # channel 0 too large by 20%, both channels offset
        return 0.5 * x * torch.tensor([1.2, 1.0]).view(1, 2, 1, 1) + shift

    corr = TAC.estimate(quantized, solver, calib, 8, progress=False)
    q, o = quantized(calib.xs[:, 1], None, None), calib.outs[:, 1]
    n_c = o.numel() // 2
    expect = ((q * o).sum((0, 2, 3)) + TAC.PULL * n_c) / ((q * q).sum((0, 2, 3)) + TAC.PULL * n_c)
    assert torch.allclose(corr.stats["scale"][1], expect, rtol=1e-4)
    assert corr.stats["scale"][1, 0] < corr.stats["scale"][1, 1]  # the enlarged channel is scaled down
    assert torch.equal(corr.stats["input_bias"][0], torch.zeros(2))  # the noise itself is not corrected
    # on other noises, the corrected quantized trajectory drifts far less from the FP one
    held = _linear_trajectories(32, 1, solver)
    final = {}
    for name, s in (("plain", solver), ("tac", CorrectedSolver(solver, corr))):
        final[name] = run_trajectory(quantized, s, held.xs[:, 0])
    drift = {k: (v - held.final).mean((0, 2, 3)).abs().max() for k, v in final.items()}
    assert drift["tac"] < 0.1 * drift["plain"], drift


def test_qncd_estimates_the_mean_quantization_noise_on_renoised_samples():
    solver = make_solver("ddim", dict(diffusers.DDIMScheduler().config), STEPS)
    alphas = solver.scheduler.alphas_cumprod
    x0 = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    offsets = [0.05, -0.1, 0.2, 0.0]
    xs = x0.expand(16, STEPS + 1, -1, -1, -1).clone()  # every trajectory ends at x0
    calib = Trajectories(xs, torch.zeros(16, STEPS, 2, 6, 6), solver.timesteps, Conditions(), {})

    def fp(x, t, cond):  # the noise a sample of x0 holds
        a = alphas[int(t)]
        return (x - a.sqrt() * x0[0]) / (1 - a).sqrt()

    def quantized(x, t, cond):  # off by a constant per step
        return fp(x, t, cond) + offsets[int((solver.timesteps == t).nonzero())]

    corr = QNCD.estimate(quantized, solver, calib, 8, progress=False, reference=fp)
    assert torch.allclose(corr.stats["mean"], torch.tensor(offsets), atol=1e-4)
    x, target = solver.renoise(2, x0, torch.randn(x0.shape))
    fixed = corr.output(corr.at(solver.timesteps[2]), x, quantized(x, solver.timesteps[2], None))
    assert torch.allclose(fixed, target, atol=1e-4)


@pytest.mark.parametrize("name,config", [
    ("ddim", dict(diffusers.DDIMScheduler().config)),
    ("ddim", dict(diffusers.DDIMScheduler(prediction_type="v_prediction").config)),
    ("dpm++", dict(diffusers.DDIMScheduler(prediction_type="sample").config)),
    ("flow-euler", dict(diffusers.FlowMatchEulerDiscreteScheduler().config)),
])
def test_renoising_gives_the_output_that_predicts_the_clean_sample(name, config):
    solver = make_solver(name, config, 5)
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for i in (0, 2, 4):
        x, target = solver.renoise(i, x0, noise)
        assert torch.allclose(solver.predicted_x0(i, x, target), x0, atol=1e-4)
