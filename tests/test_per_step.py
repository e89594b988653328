"""The per-step (Q-Diffusion-style) method: data, blocks, reconstruction, resume, and the
official code's defects (METHOD.md section 3), one test each."""

import diffusers
import pytest
import torch

import accuquant as aq
from accuquant.calibrate.blocks import find_blocks
from accuquant.quant.layers import QuantLayer, all_quantizers
from accuquant.calibrate.loop import calibrate
from accuquant.calibrate.protocol import Run
from accuquant.methods import per_step as ps
from accuquant.methods.naive import Naive, NaiveConfig
from accuquant.quant.quantizers import UniformQuantizer
from conftest import class_pipeline, text_conditions, tiny_cond_unet

W4A8 = aq.QuantConfig(weight_bits=4, act_bits=8)
FAST = dict(iters=30, act_iters=10, samples_per_step=4)


def _context(pipe=None, steps=4, num=6, batch_size=8, cfg=W4A8, **options):
    """A wrapped class-conditional model (guidance 2) and its calibration context, not frozen."""
    pipe = pipe or class_pipeline()
    den = pipe.denoiser()
    solver = aq.make_solver("ddim", pipe.scheduler_config, steps)
    calib = aq.collect_trajectories(den, solver, num, cond=pipe.conditions(num), progress=False)
    pipe.denoiser().wrap(cfg)
    run = Run(den, solver, calib, cfg, batch_size=batch_size, progress=False, seed=0)
    run.method = ps.PerStepConfig(**{**FAST, **options})
    return run


def _calibrate(ctx):
    calibrate(ctx, ps.PerStep(ctx.method))


def _state(model):
    out = {}
    for name, q in all_quantizers(model).items():
        out[name + ".scale"] = q.scale.detach().clone()
        out[name + ".zero_point"] = q.zero_point.clone()
        if q.alpha is not None:
            out[name + ".alpha"] = q.alpha.detach().clone()
    return out


def _output_error(ctx, fp_model):
    """Relative error of the wrapped model's guided output on the FP trajectory points."""
    fp_den = aq.make_denoiser(fp_model, ctx.denoiser.guidance_scale, ctx.denoiser.null_class)
    num = den = 0.0
    with torch.no_grad():
        for x, t, cond in ctx.calib.batches(ctx.calib.points(100, seed=1), ctx.batch_size):
            ref = fp_den(x, t, cond)
            num += (ctx.denoiser(x, t, cond) - ref).pow(2).sum().item()
            den += ref.pow(2).sum().item()
    return (num / den) ** 0.5


# ---------------------------------------------------------------------------- data
def test_points_are_spread_evenly_over_steps_and_shuffled():
    ctx = _context(steps=5, num=10)
    pts = ctx.calib.points(per_step=3, seed=0)
    assert len(pts) == 15
    for i in range(5):
        ks = [k for k, s in pts if s == i]
        assert len(ks) == 3 and len(set(ks)) == 3  # distinct trajectories at each step
    assert [s for _, s in pts] != sorted(s for _, s in pts)  # mixed, not step by step
    assert pts == ctx.calib.points(per_step=3, seed=0)  # seeded
    # each batch carries one timestep per sample, taken from the stored trajectories
    x, t, cond = next(ctx.calib.batches(pts, ctx.batch_size))
    k, i = pts[0]
    assert torch.equal(x[0], ctx.calib.xs[k, i]) and t[0] == ctx.calib.timesteps[i]
    assert cond["labels"][0] == ctx.calib.cond["labels"][k]


def test_guided_models_calibrate_both_branches():
    ctx = _context()
    seen = []
    hook = ctx.denoiser.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["class_labels"].clone()), with_kwargs=True)
    blocks = find_blocks(ctx.denoiser.model, lambda: ctx.denoiser(*next(ctx.calib.batches([(0, 0)], 1))),
                         ctx.denoiser.block_types)
    seen.clear()
    data = ps.collect(ctx.denoiser, blocks[1].module, ctx.calib.batches(ctx.calib.points(4, 0), ctx.batch_size))
    hook.remove()
    labels = torch.cat(seen)
    assert (labels == 10).sum() == (labels != 10).sum() > 0  # null class and real classes, as many
    assert data.rows == 2 * 4 * 4  # two branches of 4 points at each of 4 steps


def test_blocks_follow_execution_order_and_cover_every_quantizer():
    ctx = _context()
    model = ctx.denoiser.model
    blocks = find_blocks(model, lambda: ctx.denoiser(*next(ctx.calib.batches([(0, 0)], 1))), ctx.denoiser.block_types)
    names = [b.name for b in blocks]
    assert names[0] == "time_embedding"
    assert names.index("mid_block.resnets.0") < names.index("up_blocks.0.resnets.0")  # not registration order
    assert "down_blocks.1.attentions.0" in names and "up_blocks.0.upsamplers.0" in names
    owned = [id(q) for b in blocks for q in b.weight_quant + b.act_quant]
    assert len(owned) == len(set(owned))
    assert set(owned) == {id(q) for q in all_quantizers(model).values()}


# ---------------------------------------------------------------------------- method
def test_per_step_lowers_block_losses_and_the_output_error_of_naive(watched_run):
    fp = class_pipeline()
    naive_ctx = _context()
    calibrate(naive_ctx, Naive(NaiveConfig()))
    ctx, _ = watched_run
    blocks = ctx.log["blocks"]
    assert len(blocks) == 15
    improved = sum(v["loss"] < v["loss_naive"] for v in blocks.values())
    assert improved >= 13, blocks
    e_naive, e_step = _output_error(naive_ctx, fp.model), _output_error(ctx, fp.model)
    assert e_step < 0.9 * e_naive, (e_step, e_naive)
    # the FP weights are untouched and not trainable afterwards either way
    for layer in (m for m in ctx.denoiser.model.modules() if isinstance(m, QuantLayer)):
        assert layer.module.weight.requires_grad


def test_per_step_on_a_text_conditioned_unet_via_the_api():
    fp = aq.Pipeline(tiny_cond_unet(), dict(diffusers.DDIMScheduler().config), defaults=aq.SamplingDefaults(3.0))
    solver = aq.make_solver("ddim", fp.scheduler_config, 3)
    calib = aq.collect_trajectories(fp.denoiser(), solver, 4, cond=text_conditions(4), progress=False)
    cfg = aq.QuantConfig(weight_bits=4, act_bits=8)
    naive = aq.quantize(fp, cfg, "naive", calib=calib, steps=3, progress=False)
    q = aq.quantize(fp, cfg, "per-step", calib=calib, steps=3, progress=False, iters=30, act_iters=10,
                    samples_per_step=4)
    names = list(q.quant.method_log["blocks"])
    assert any(n.endswith("transformer_blocks.0") for n in names)  # cross-attention blocks, with the text inputs
    x, cond = torch.randn(4, 4, 8, 8), text_conditions(4, seed=3)
    with torch.no_grad():
        ref = fp.denoiser()(x, 500, cond)
        err = {k: ((m.denoiser()(x, 500, cond) - ref).norm() / ref.norm()).item() for k, m in
               (("naive", naive), ("per-step", q))}
    assert err["per-step"] < err["naive"], err
    q.save(q_dir := __import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "q")
    assert aq.load(q_dir).quant.method == "per-step"


def test_options_are_checked_before_any_work():
    with pytest.raises(aq.AccuQuantError, match="unknown option.*iterations"):
        aq.quantize(class_pipeline(), W4A8, "per-step", steps=2, calib_samples=2, iterations=5)
    with pytest.raises(aq.AccuQuantError, match="method 'naive': unknown option"):
        aq.quantize(class_pipeline(), W4A8, "naive", steps=2, calib_samples=2, iters=5)


def test_block_data_spilled_to_disk_gives_the_same_result(tmp_path):
    a = _context(iters=10, act_iters=4)
    _calibrate(a)
    b = _context(iters=10, act_iters=4)
    b.max_memory, b.spill_dir = 0, str(tmp_path / "spill")
    _calibrate(b)
    assert all(v["chunks_on_disk"] > 0 for v in b.log["blocks"].values())
    sa, sb = _state(a.denoiser.model), _state(b.denoiser.model)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any((tmp_path / "spill").iterdir())  # nothing left behind


# ---------------------------------------------------------------------------- resume
def _quantize(**kw):
    return aq.quantize(class_pipeline(), W4A8, "per-step", steps=3, calib_samples=4, batch_size=8, progress=False,
                       iters=8, act_iters=4, samples_per_step=2, **kw)


def _codes(q):
    return {n: m.int_codes().clone() for n, m in q.model.named_modules() if isinstance(m, QuantLayer)}


@pytest.mark.slow  # a whole calibration run, twice
def test_an_interrupted_run_resumes_to_the_same_result(monkeypatch):
    from accuquant.cache import cache_dir

    full = _quantize()
    assert not list((cache_dir() / "runs").glob("*.safetensors"))  # removed after success
    real, calls = ps.collect, []

    def interrupt_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ps, "collect", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        _quantize()
    monkeypatch.setattr(ps, "collect", real)
    assert len(list((cache_dir() / "runs").glob("*.safetensors"))) == 1
    resumed = _quantize(resume=True)
    assert resumed.quant.method_log["resumed_at"]["unit"] == 2
    a, b = _codes(full), _codes(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = _state(full.model), _state(resumed.model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # resume with nothing to resume (or other settings) starts over and gives the same result too
    again = _quantize(resume=True)
    assert "resumed_at" not in again.quant.method_log
    assert all(torch.equal(a[k], v) for k, v in _codes(again).items())


# ---------------------------------------------------------------------------- Q-Diffusion's defects
def test_defect_symmetric_quantizer_clamps_symmetrically():
    # Q-Diffusion's "symmetric" quantizer clamps to [-2^(b-1), 2^(b-1)-1]: -x and x quantize differently.
    for bits in range(2, 9):
        q = UniformQuantizer(bits, symmetric=True)
        x = torch.linspace(-3, 3, 601)
        q.init_range(x, "minmax")
        assert torch.equal(q(-x), -q(x))
        assert q.qmin == -q.qmax


def _split_layers(model):
    layers = [m for m in model.modules() if isinstance(m, QuantLayer) and m.split is not None]
    assert layers
    return layers


@pytest.fixture(scope="module")
def watched_run():
    """One per-step run (batch size 4) with spies on the regulariser, the weights and the batches."""
    ctx = _context(batch_size=4, iters=60)
    model = ctx.denoiser.model
    fp_weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("module.weight"))
    seen = {"reg": set(), "rows": [], "extra_floats": []}
    real_reg, real_harden, real_loss = UniformQuantizer.rounding_regularizer, ps.harden, ps._block_loss

    def reg(self, beta):
        seen["reg"].add(id(self))
        return real_reg(self, beta)

    def harden(layers, *args):
        real_harden(layers, *args)
        # inside the run: one float copy of each weight, plus AdaRound's own variables
        tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}
        floats = sum(t.numel() for t in tensors.values() if t.is_floating_point())
        alphas = sum(q.alpha.numel() for q in all_quantizers(model).values() if q.alpha is not None)
        seen["extra_floats"].append((floats - alphas - fp_weights) / fp_weights)

    def loss(block, batch):
        if torch.is_grad_enabled():  # the learning steps (not the before/after loss probes)
            seen["rows"].append((batch[0][0].shape[0], batch[0][0].device.type))
        return real_loss(block, batch)

    UniformQuantizer.rounding_regularizer, ps.harden, ps._block_loss = reg, harden, loss
    try:
        _calibrate(ctx)
    finally:
        UniformQuantizer.rounding_regularizer, ps.harden, ps._block_loss = real_reg, real_harden, real_loss
    return ctx, seen


def test_defect_second_split_half_learns_its_rounding(watched_run):
    ctx, _ = watched_run
    for layer in _split_layers(ctx.denoiser.model):
        for q, part in layer.weight_parts():
            assert q.alpha is not None and not q.soft_rounding
            learned = torch.floor(part / q.scale) + (q.alpha >= 0).float()
            nearest = torch.round(part / q.scale)
            assert (learned != nearest).any()  # rounding was learned for this half too


def test_defect_rounding_regulariser_covers_both_split_halves(watched_run):
    ctx, seen = watched_run
    halves = {id(q) for layer in _split_layers(ctx.denoiser.model) for q in layer.weight_quant}
    assert len(halves) >= 2 and halves <= seen["reg"]


def test_defect_weights_are_held_once_during_calibration(watched_run):
    _, seen = watched_run
    assert len(seen["extra_floats"]) == 15  # checked after every block
    assert max(seen["extra_floats"]) < 0.2  # norms, biases, step sizes: no second weight copy


@pytest.mark.slow  # a whole calibration run, twice
def test_defect_batch_size_and_device_are_parameters(watched_run):
    _, seen = watched_run
    assert max(r for r, _ in seen["rows"]) == 4
    assert {d for _, d in seen["rows"]} == {"cpu"}
    ctx = _context(batch_size=16, iters=2, act_iters=2)
    ctx.device = torch.device("cpu")
    _calibrate(ctx)  # a torch.device works as well as a string


def test_max_memory_spills_block_data_with_the_same_result():
    """``max_memory`` (``--max-memory``) bounds the block data kept in RAM; below one chunk
    every chunk goes to disk, and the model is the same bit for bit."""
    from accuquant.config import parse_size

    assert [parse_size(s) for s in ("4GB", "512MB", "1.5g", "2048", "0")] == [4 * 2**30, 512 * 2**20,
                                                                             int(1.5 * 2**30), 2**31, 0]
    for bad in ("lots", "-1GB", "4TB", "inf"):
        with pytest.raises(aq.AccuQuantError, match="memory size"):
            parse_size(bad)
    a, b = _quantize(), _quantize(max_memory="1kB")
    assert all(v["chunks_on_disk"] == 0 for v in a.quant.method_log["blocks"].values())
    assert all(v["chunks_on_disk"] > 0 for v in b.quant.method_log["blocks"].values())
    ca, cb = _codes(a), _codes(b)
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)


def test_block_data_holds_at_most_its_budget_and_one_capture_batch(tmp_path):
    """Rows past the budget go to files as they come, also inside a chunk being filled: RAM
    never holds more than ``max_bytes`` plus one added batch, and every batch drawn is the
    one an unbounded store gives."""
    from accuquant.calibrate.block_data import BlockData

    g = torch.Generator().manual_seed(0)
    adds = [(torch.randn(4, 3, 8, generator=g), torch.randn(4, 5, generator=g), torch.randn(4, 3, 8, generator=g))
            for _ in range(25)]
    one_add = sum(t.numel() * 4 for t in adds[0])
    stores = {b: BlockData(chunk_rows=40, max_bytes=b, spill_dir=tmp_path / "spill") for b in (2**30, 3 * one_add, 0)}
    for data in stores.values():
        for x, emb, y in adds:
            data.add((x,), {"emb": emb, "flag": True}, y)
        data.finish()
    full, small, none = stores.values()
    assert full.on_disk == 0 and full.ram_bytes == 25 * one_add
    assert small.peak_ram_bytes <= 3 * one_add + one_add and small.ram_bytes <= 3 * one_add and small.on_disk >= 2
    assert none.ram_bytes == 0 and none.on_disk == len(none.chunks) == 3
    for seed in range(5):
        ref = full.batch(torch.Generator().manual_seed(seed), 16)
        for data in (small, none):
            args, kwargs, y = data.batch(torch.Generator().manual_seed(seed), 16)
            assert torch.equal(args[0], ref[0][0]) and torch.equal(kwargs["emb"], ref[1]["emb"])
            assert kwargs["flag"] is True and torch.equal(y, ref[2])
    for data in stores.values():
        data.close()
    assert not any((tmp_path / "spill").iterdir())
