import pytest
import torch

import accuquant as aq
from accuquant.calibrate.data import seeded_noise
from conftest import class_pipeline


def test_trajectories_round_trip(tmp_path):
    pipe = class_pipeline()
    solver = aq.make_solver("ddim", pipe.scheduler_config, 5)
    cond = pipe.conditions(6)
    traj = aq.collect_trajectories(pipe.denoiser(), solver, 6, seed=3, cond=cond, batch_size=4, progress=False)
    assert traj.xs.shape == (6, 6, 1, 16, 16) and traj.outs.shape == (6, 5, 1, 16, 16)
    assert torch.equal(traj.timesteps, solver.timesteps)
    assert traj.cond["labels"].tolist() == [0, 1, 2, 3, 4, 5]
    path = tmp_path / "calib.safetensors"
    traj.save(path)
    back = aq.Trajectories.load(path)
    for name in ("xs", "outs", "timesteps"):
        assert torch.equal(getattr(back, name), getattr(traj, name))
    assert torch.equal(back.cond["labels"], traj.cond["labels"])
    assert back.meta["guidance_scale"] == 2.0 and back.meta["solver"] == "ddim" and back.meta["steps"] == 5
    # the trajectory is the sampler's own: its last point is what sampling returns from the same
    # noise (in the same batches: with one thread, a batch's size can change the conv algorithm)
    final = pipe.sample(6, seed=3, steps=5, batch_size=4, progress=False, stream="calib")
    assert torch.allclose(back.final, final, atol=1e-5)


def test_seeded_noise_does_not_depend_on_batching():
    a = seeded_noise((1, 4, 4), 0, range(6), "calib")
    b = torch.cat([seeded_noise((1, 4, 4), 0, [k], "calib") for k in range(6)])
    assert torch.equal(a, b)
    assert not torch.equal(a, seeded_noise((1, 4, 4), 0, range(6), "sample"))


def test_quantize_reuses_cached_calibration(tmp_path, monkeypatch):
    pipe = class_pipeline()
    calls = []
    import accuquant.api as api

    real = api.collect_trajectories
    monkeypatch.setattr(api, "collect_trajectories", lambda *a, **k: calls.append(1) or real(*a, **k))
    q1 = aq.quantize(pipe, method="naive", steps=3, calib_samples=4, progress=False)
    q2 = aq.quantize(pipe, method="naive", steps=3, calib_samples=4, progress=False)
    assert len(calls) == 1
    cached = list((tmp_path / "cache" / "calib").glob("*.safetensors"))
    assert len(cached) == 1
    x = torch.randn(2, 1, 16, 16)
    cond = aq.Conditions(labels=torch.tensor([1, 2]))
    with torch.no_grad():
        assert torch.equal(q1.denoiser()(x, 300, cond), q2.denoiser()(x, 300, cond))


def test_an_fp_model_that_produces_nan_is_refused_naming_the_step():
    """Trajectory collection stops with the first step whose model output is not finite."""
    import accuquant as aq
    from conftest import class_pipeline

    pipe = class_pipeline()
    den = pipe.denoiser(1.0)
    solver = aq.make_solver("ddim", pipe.scheduler_config, 5)
    raw = den.raw

    def broken(x, t, cond):
        out = raw(x, t, cond)
        return out * float("nan") if float(t.flatten()[0]) < float(solver.timesteps[2]) + 1e-3 else out

    den.raw = broken
    with pytest.raises(aq.AccuQuantError, match=r"not finite \(NaN or inf\) at sampling step 2 "):
        aq.collect_trajectories(den, solver, 4, cond=pipe.conditions(4), progress=False)


def test_saved_trajectories_are_read_from_the_disk_by_the_rows_used(tmp_path):
    """Loaded sets are views of the file mapped in memory (nothing is read until used): the
    same tensors, rows and digest as a set read whole."""
    pipe = class_pipeline()
    solver = aq.make_solver("ddim", pipe.scheduler_config, 4)
    traj = aq.collect_trajectories(pipe.denoiser(), solver, 5, seed=1, cond=pipe.conditions(5), batch_size=5,
                                   progress=False)
    path = tmp_path / "calib.safetensors"
    traj.save(path)
    mapped, whole = aq.Trajectories.load(path), aq.Trajectories.load(path, mmap=False)
    assert mapped.xs.untyped_storage().nbytes() == path.stat().st_size  # the file itself
    for name in ("xs", "outs", "timesteps"):
        assert torch.equal(getattr(mapped, name), getattr(whole, name))
    assert torch.equal(mapped.xs[[4, 1], 2], traj.xs[[4, 1], 2]) and mapped.digest() == traj.digest()


@pytest.mark.parametrize("pipe_kind", ["class", "text"])
def test_collection_streamed_to_a_file_equals_the_set_held_in_memory(tmp_path, pipe_kind):
    """With ``path``, rows go to the file batch by batch (header first) and the set comes back
    mapped from it: the same tensors, conditions, metadata and digest as the in-memory set,
    readable by safetensors itself, and nothing left beside it."""
    from safetensors.torch import load_file

    from conftest import text_conditions, tiny_cond_unet

    if pipe_kind == "class":
        pipe, cond = class_pipeline(), None
    else:
        pipe = aq.Pipeline(tiny_cond_unet(), class_pipeline().scheduler_config, defaults=aq.SamplingDefaults(3.0))
        cond = text_conditions(5)
    cond = cond if cond is not None else pipe.conditions(5)
    solver = aq.make_solver("ddim", pipe.scheduler_config, 4)
    kw = dict(seed=2, cond=cond, batch_size=2, progress=False, meta={"model": "m1"})
    held = aq.collect_trajectories(pipe.denoiser(), solver, 5, **kw)
    path = tmp_path / "calib.safetensors"
    streamed = aq.collect_trajectories(pipe.denoiser(), solver, 5, path=path, **kw)
    assert streamed.xs.untyped_storage().nbytes() == path.stat().st_size  # mapped from the file
    for name in ("xs", "outs", "timesteps"):
        assert torch.equal(getattr(streamed, name), getattr(held, name)), name
    assert [k for k, _ in streamed.cond.items()] == [k for k, _ in held.cond.items()]
    assert all(torch.equal(streamed.cond[k], v) for k, v in held.cond.items())
    assert streamed.meta == held.meta and streamed.meta["model"] == "m1"
    assert streamed.digest() == held.digest()
    whole = load_file(str(path))
    assert torch.equal(whole["xs"], held.xs) and torch.equal(whole["timesteps"], held.timesteps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.safetensors"]
