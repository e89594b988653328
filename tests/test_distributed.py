"""Data-parallel calibration: 2 gloo ranks give the 1-process model, and resume on 1 rank."""

import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import accuquant as aq
from accuquant.quant.layers import all_quantizers, quant_layers
from conftest import class_pipeline

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")

CFG = dict(weight_bits=4, act_bits=8)
COMMON = dict(steps=4, calib_samples=8, batch_size=4, progress=False)
METHODS = {
    "per-step": dict(iters=12, act_iters=6, samples_per_step=8),
    "accuquant": dict(init="naive", iters=10, group_size=2, traj_batch=4, save_every=3, lr=1e-2),
}


def _state(q) -> dict[str, torch.Tensor]:
    out = {f"{n}.scale": t.scale.detach().clone() for n, t in all_quantizers(q.model).items() if t.scale is not None}
    out.update({f"{n}.codes": l.int_codes().clone() for n, l in quant_layers(q.model).items() if l.frozen})
    return out


def _quantize(method: str, **kw):
    return aq.quantize(class_pipeline(), aq.QuantConfig(**CFG), method, **COMMON, **{**METHODS[method], **kw})


def _worker(rank: int, size: int, root: str, method: str, interrupt_at: int, opts: dict) -> None:
    os.environ["ACCUQUANT_CACHE"] = os.path.join(root, "cache")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=size)
    try:
        if interrupt_at:
            import accuquant.methods.accuquant as mod

            real, calls = mod.multistep_backward, []

            def interrupt(*a, **k):
                calls.append(1)
                if len(calls) == interrupt_at:
                    raise KeyboardInterrupt
                return real(*a, **k)

            mod.multistep_backward = interrupt
            try:
                _quantize(method, **opts)
            except KeyboardInterrupt:
                pass
            return
        q = _quantize(method, **opts)
        if rank == 0:
            save_file(_state(q), os.path.join(root, "state.safetensors"))
            (open(os.path.join(root, "log.json"), "w")).write(json.dumps(q.quant.method_log, default=str))
    finally:
        dist.destroy_process_group()


def _two_ranks(tmp_path, method: str, interrupt_at: int = 0, **opts) -> dict:
    mp.spawn(_worker, args=(2, str(tmp_path), method, interrupt_at, opts), nprocs=2, join=True)
    return load_file(str(tmp_path / "state.safetensors")) if not interrupt_at else {}


@pytest.fixture
def one_thread():
    """One thread, as in each rank: the same conv algorithms and summation orders."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="spawned gloo ranks are tested on Linux")
@pytest.mark.parametrize("method", ["per-step", "accuquant"])
def test_two_ranks_compute_what_one_process_does_in_two_micro_batches(tmp_path, monkeypatch, one_thread, method):
    """Each rank collects half of the trajectories and computes the loss on half of every
    batch; the gradients are summed by share. One process with the batch cut in two
    micro-batches computes the same pieces: the same model, bit for bit. (One process on
    whole batches differs by float rounding, which Adam's first steps make visible.)"""
    monkeypatch.setenv("ACCUQUANT_CACHE", str(tmp_path / "one"))
    q = _quantize(method, micro_batches=2)
    one = _state(q)
    two = _two_ranks(tmp_path, method)
    assert one.keys() == two.keys() and any(k.endswith(".codes") for k in one)
    assert all(torch.equal(one[k], two[k]) for k in one), [k for k in one if not torch.equal(one[k], two[k])][:5]
    if method == "per-step":  # each block's 8 batches: rank 0 captured the first and 4 of the other 7
        blocks = json.loads((tmp_path / "log.json").read_text())["blocks"]
        assert blocks and all(b["rows_captured"] * 8 == b["rows"] * 5 for b in blocks.values()), blocks
        assert all(b["rows_captured"] == b["rows"] for b in q.quant.method_log["blocks"].values())
    # rank 0 alone wrote: the trajectories' cache entry, and no checkpoint is left
    assert len(list((tmp_path / "cache" / "calib").glob("*.safetensors"))) == 1
    assert not list((tmp_path / "cache" / "runs").glob("*.safetensors"))


def test_micro_batches_give_the_whole_batch_gradient(monkeypatch, one_thread):
    """Two micro-batches against one pass: the loss and every gradient of the first
    optimisation step equal to float rounding (later steps drift apart: Adam moves a
    near-zero gradient by the full rate whatever its sign)."""
    import accuquant.calibrate.loop as engine

    real, seen = engine._loss_and_gradients, []

    def spy(run, phase, gen, it, params):
        loss = real(run, phase, gen, it, params)
        if not seen:
            seen.append((loss, [p.grad.clone() for p in params]))
        return loss

    firsts = []
    for parts in (1, 2):
        seen.clear()
        monkeypatch.setattr(engine, "_loss_and_gradients", spy)
        _quantize("accuquant", iters=1, micro_batches=parts)
        firsts.append(seen[0])
    (la, ga), (lb, gb) = firsts
    assert la == pytest.approx(lb, rel=1e-5) and len(ga) == len(gb) > 10
    scale = max(g.abs().max().item() for g in ga)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5 * scale)
    with pytest.raises(aq.AccuQuantError, match="cannot be split into 8 pieces"):
        _quantize("accuquant", iters=2, micro_batches=8)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="spawned gloo ranks are tested on Linux")
def test_an_interrupted_two_rank_run_resumes_on_one_rank(tmp_path, monkeypatch, one_thread):
    """Checkpoints hold nothing rank-specific: 2 ranks interrupted at their 8th optimisation
    step (checkpoint after the 6th) resume on one process to the result it would have
    reached in two micro-batches."""
    monkeypatch.setenv("ACCUQUANT_CACHE", str(tmp_path / "one"))
    one = _state(_quantize("accuquant", micro_batches=2))
    _two_ranks(tmp_path, "accuquant", interrupt_at=8)
    assert len(list((tmp_path / "cache" / "runs").glob("*.safetensors"))) == 1
    monkeypatch.setenv("ACCUQUANT_CACHE", str(tmp_path / "cache"))
    resumed = _quantize("accuquant", resume=True, micro_batches=2)
    assert resumed.quant.method_log["resumed_at"]["iteration"] == 6
    two = _state(resumed)
    assert all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.slow
def test_a_model_has_the_same_fingerprint_in_every_process():
    """Caches, checkpoints and the ranks' agreement rest on the model's fingerprint: it must
    not depend on the process (diffusers keeps a list in set order in its configs)."""
    import subprocess

    code = "from conftest import class_pipeline; print(class_pipeline().fingerprint())"
    prints = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(__file__), env={**os.environ, "PYTHONHASHSEED": seed}).stdout
              for seed in ("1", "2", "3")}
    assert len(prints) == 1 and prints.pop().strip() == class_pipeline().fingerprint()
