"""Outlier handling: smoothing, rotation and the low-rank branch are exact rewrites of the
layer, their closed-form start helps 4-bit activations, and they freeze, save and load."""

import json

import pytest
import torch
from torch import nn

import accuquant as aq
from accuquant.calibrate.block_data import quantization_disabled
from accuquant.quant.layers import QuantLayer, quant_layers
from accuquant.quant.outliers import hadamard, rotate, rotation_block
from conftest import text_pipeline_and_calibration, text_conditions


def test_the_hadamard_blocks_are_orthonormal():
    for n in (8, 64, 256):
        h = hadamard(n)
        assert torch.allclose(h @ h.t(), torch.eye(n), atol=1e-6) and torch.equal(h, h.t())
    assert rotation_block(4 * 96) == 128 and rotation_block(1024) == 256 and rotation_block(12) is None
    with pytest.raises(ValueError):
        hadamard(12)


@pytest.mark.parametrize("kind", ["linear", "conv", "1x1 conv", "split 1x1 conv"])
@pytest.mark.parametrize("conv_outliers", [False, True])
def test_the_transforms_leave_the_fp_output_unchanged(kind, conv_outliers):
    torch.manual_seed(0)
    module = nn.Linear(96, 24) if kind == "linear" else nn.Conv2d(32, 8, 3 if kind == "conv" else 1, padding="same")
    x = torch.randn(3, 7, 96) if kind == "linear" else torch.randn(2, 32, 5, 5)
    with torch.no_grad():
        ref = module(x)
    split = 24 if kind.startswith("split") else None
    layer = QuantLayer(module, aq.QuantConfig(weight_bits=4, act_bits=4, outliers="smooth,rotate,lowrank", rank=4,
                                              conv_outliers=conv_outliers), split=split)
    o = layer.outliers
    if split is not None and not conv_outliers:
        assert o is None  # a split layer: nothing by default
        return
    assert o.block == (None if split else 32)  # rotation would mix a split layer's parts
    assert o.log_smooth.shape == (x.shape[1 if "conv" in kind else -1],)
    # the branch: linear layers, and with conv_outliers, 1x1 convolutions
    assert (o.lora_a is not None) == (kind == "linear" or (conv_outliers and "1x1" in kind))
    with torch.no_grad():
        o.log_smooth.normal_()
        o.initialise(module.weight, None)  # the branch from the smoothed, rotated weight
        with quantization_disabled(layer):
            assert torch.allclose(layer(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_a_rotation_folded_into_v_leaves_the_fp_output_unchanged(family, request):
    """Each attention output projection takes its input rotated from V (folded into V's weight
    and bias); the other rotated layers rotate online; the FP output does not move."""
    pipe = aq.load(request.getfixturevalue(f"{family}_pipeline_dir"))
    den, x, t = pipe.denoiser(), torch.randn(2, 4, 8, 8), torch.tensor(500.0)
    cond = pipe.conditions(2)
    with torch.no_grad():
        ref = den(x, t, cond)
    report = den.wrap(aq.QuantConfig(weight_bits=4, act_bits=4, outliers="smooth,rotate,lowrank", rank=2,
                                     attn_bits=8, softmax_bits=8))
    layers = quant_layers(pipe.model)
    outputs = [n for n in layers if n.endswith(("to_out.0", "to_add_out"))]
    assert outputs and set(report.rotation_folded) == set(outputs)
    assert any(lyr.outliers is not None and lyr.outliers.block and not lyr.outliers.folded for lyr in layers.values())
    torch.manual_seed(1)
    with torch.no_grad():
        for consumer, producers in report.rotation_folded.items():
            block = layers[consumer].outliers.block
            assert layers[consumer].outliers.folded and producers[0].endswith("to_v")
            for name in producers:  # V comes out rotated within each head
                v, inp = layers[name], torch.randn(3, layers[name].in_features)
                with quantization_disabled(v):
                    torch.testing.assert_close(v(inp), rotate(v.module(inp), -1, block), atol=1e-5, rtol=1e-5)
                assert v.out_block == block
        for lyr in layers.values():
            if lyr.outliers is not None:
                if lyr.outliers.log_smooth is not None:
                    lyr.outliers.log_smooth.normal_()
                lyr.outliers.initialise(lyr.base_weight(), None)
        with quantization_disabled(pipe.model):
            torch.testing.assert_close(den(x, t, cond), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "1x1 conv"])
def test_a_full_rank_branch_leaves_nothing_to_quantize(kind):
    torch.manual_seed(0)
    module = nn.Linear(16, 12) if kind == "linear" else nn.Conv2d(16, 12, 1)
    x = torch.randn(5, 16) if kind == "linear" else torch.randn(2, 16, 3, 3)
    layer = QuantLayer(module, aq.QuantConfig(weight_bits=2, act_bits=2, outliers="lowrank", rank=64,
                                              conv_outliers=True))
    assert layer.outliers.lora_a.shape == (12, 16)  # capped by the weight's shape
    with torch.no_grad():
        layer.outliers.initialise(module.weight, None)
        for q, part in layer.weight_parts():
            assert part.abs().max() < 1e-5  # the residual
            q.init_range(part, "minmax")
        layer.input_quant[0].init_range(x, "minmax")
        assert torch.allclose(layer(x), module(x), atol=1e-5)  # 2-bit everything, and still the layer
        low = QuantLayer(type(module)(16, 12, *([] if kind == "linear" else [1])),
                         aq.QuantConfig(weight_bits=2, act_bits=2))
        low.module.load_state_dict(module.state_dict())
        low.weight_quant[0].init_range(module.weight, "minmax")
        low.input_quant[0].init_range(x, "minmax")
        assert (low(x) - module(x)).abs().max() > 0.1


def test_smoothing_and_rotation_tame_outlier_channels():
    """Inputs with three channels 100x the rest, 4-bit activations: smoothing then rotation
    (their closed-form start) cuts the output error to a small fraction, per tensor and per
    token. (Smoothing alone leaves a 10x outlier at a = 0.5, and per tensor made it worse.)"""
    torch.manual_seed(0)
    module = nn.Linear(64, 32)
    x = torch.randn(256, 64)
    x[:, :3] *= 100
    with torch.no_grad():
        ref = module(x)
    errs = {}
    for gran in ("tensor", "token"):
        for outliers in ("none", "smooth,rotate"):
            layer = QuantLayer(module, aq.QuantConfig(weight_bits=8, act_bits=4, outliers=outliers,
                                                      act_granularity=gran))
            with torch.no_grad():
                if layer.outliers is not None:
                    layer.outliers.initialise(module.weight, x.abs().amax(0))
                for q, part in layer.weight_parts():
                    q.init_range(part, "mse")
                xp = x if layer.outliers is None else layer.outliers.input(x)
                layer.input_quant[0].init_range(xp, "mse")  # per token: nothing to set
                errs[gran, outliers] = (layer(x) - ref).pow(2).mean().item()
    for gran in ("tensor", "token"):
        assert errs[gran, "smooth,rotate"] < 0.2 * errs[gran, "none"], errs


def test_the_options_validate():
    assert aq.QuantConfig(outliers=["lowrank,smooth"]).outliers == ("smooth", "lowrank")
    assert aq.QuantConfig(outliers="none").outliers == ()
    cfg = aq.QuantConfig(outliers="rotate,lowrank", rank=8)
    assert aq.QuantConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(aq.AccuQuantError, match="is not one of"):
        aq.QuantConfig(outliers="hadamard")


def test_a_model_with_every_transform_calibrates_freezes_saves_and_loads_bit_identically(tmp_path):
    fp, calib = text_pipeline_and_calibration(3, 2)
    cfg = aq.QuantConfig(weight_bits=4, act_bits=4, act_granularity="token", outliers="smooth,rotate,lowrank",
                         rank=4, attn_bits=8, softmax_bits=8)  # the attention matmuls' inputs at 8 bits
    x, cond = torch.randn(2, 4, 8, 8), text_conditions(2, seed=9)
    with torch.no_grad():
        fp_out = fp.denoiser()(x, 700, cond)
    q = aq.quantize(fp, cfg, "per-step", calib=calib, steps=3, progress=False, iters=4, act_iters=2,
                    samples_per_step=2)
    layers = quant_layers(q.model)
    with_branch = [lyr for lyr in layers.values() if lyr.outliers is not None and lyr.outliers.lora_a is not None]
    assert with_branch and any(lyr.outliers.log_smooth.abs().max() > 0 for lyr in with_branch)  # started
    q.save(tmp_path / "q")
    back = aq.load(tmp_path / "q")
    with torch.no_grad():
        out = q.denoiser()(x, 700, cond)
        assert torch.equal(out, back.denoiser()(x, 700, cond))
        assert (out - fp_out).pow(2).mean() < fp_out.pow(2).mean()
    assert back.quant.config.outliers == ("smooth", "rotate", "lowrank")
    folded = q.quant.report.rotation_folded
    assert folded and back.quant.report.rotation_folded == folded
    int8 = aq.load(tmp_path / "q", backend="int8")
    kernels = [lyr.kernel for lyr in quant_layers(int8.model).values()]
    assert all(k.runs_on == "fake" and k.why for k in kernels)  # no integer kernel takes them: each says why
    with torch.no_grad():  # the int8 attention's integer sums may flip a 4-bit activation code where fake's
        # float sums round the other way (which ones depends on the kernels oneDNN picks): close, not equal
        y = int8.denoiser()(x, 700, cond)
        assert (y - out).pow(2).mean() < 1e-2 * out.pow(2).mean()
    # a model saved before rotations were folded recorded none: it loads with every rotation online
    meta = json.loads((tmp_path / "q" / "accuquant.json").read_text())
    del meta["report"]["rotation_folded"]
    (tmp_path / "q" / "accuquant.json").write_text(json.dumps(meta))
    older = quant_layers(aq.load(tmp_path / "q").model)
    assert not any(lyr.out_block or (lyr.outliers is not None and lyr.outliers.folded) for lyr in older.values())


def test_only_pointwise_convolutions_take_the_branch():
    cfg = aq.QuantConfig(weight_bits=4, act_bits=4, outliers="lowrank", rank=4, conv_outliers=True)
    assert QuantLayer(nn.Conv1d(16, 12, 1), cfg).outliers.lora_a.shape == (4, 16)
    for module in (nn.Conv2d(16, 12, 1, stride=2), nn.Conv2d(16, 12, 1, padding=1), nn.Conv2d(16, 12, (1, 3))):
        assert QuantLayer(module, cfg).outliers is None  # no branch applies, nothing else asked for
    torch.manual_seed(0)
    module, x = nn.Conv1d(16, 12, 1), torch.randn(2, 16, 5)
    layer = QuantLayer(module, cfg)
    with torch.no_grad():
        layer.outliers.initialise(module.weight, None)
        with quantization_disabled(layer):
            torch.testing.assert_close(layer(x), module(x), atol=1e-5, rtol=1e-5)


def test_conv_outliers_give_1x1_and_split_convolutions_a_branch_that_saves_and_loads(tmp_path):
    fp, calib = text_pipeline_and_calibration(3, 2)
    cfg = aq.QuantConfig(weight_bits=4, act_bits=4, act_granularity="token", outliers="smooth,lowrank", rank=4,
                         conv_outliers=True)
    q = aq.quantize(fp, cfg, "per-step", calib=calib, steps=3, progress=False, iters=2, act_iters=1,
                    samples_per_step=2)
    layers = quant_layers(q.model)
    convs = {n: lyr for n, lyr in layers.items() if isinstance(lyr.module, nn.Conv2d)}
    pointwise = {n for n, lyr in convs.items() if lyr.module.kernel_size == (1, 1)}
    assert pointwise and any(convs[n].split for n in pointwise)
    for n, lyr in convs.items():  # 1x1 ones take the branch, split ones included; 3x3 ones smooth only
        assert (lyr.outliers.lora_a is not None) == (n in pointwise), n
    x, cond = torch.randn(2, 4, 8, 8), text_conditions(2, seed=9)
    q.save(tmp_path / "q")
    back = aq.load(tmp_path / "q")
    assert back.quant.config.conv_outliers
    with torch.no_grad():
        assert torch.equal(q.denoiser()(x, 700, cond), back.denoiser()(x, 700, cond))


def test_accuquant_learns_the_transforms_under_its_multistep_loss():
    """By default the transforms keep their start and the step sizes alone learn; ``branch``
    learns the low-rank factors, ``all`` the smoothing scales too (with the codes kept, a new
    scale rescales the inputs alone)."""
    fp, calib = text_pipeline_and_calibration(4, 4)
    cfg = aq.QuantConfig(weight_bits=4, act_bits=4, outliers="smooth,lowrank", rank=2, attn_bits=8, softmax_bits=8)
    kw = dict(calib=calib, steps=4, progress=False, init="naive", group_size=2, batch_size=2)
    start = quant_layers(aq.quantize(fp, cfg, "accuquant", iters=0, **kw).model)
    with_outliers = [n for n in start if start[n].outliers is not None]
    assert with_outliers
    for learn, moving in (("branch", {"lora_a", "lora_b"}), ("all", {"log_smooth", "lora_a", "lora_b"}),
                          (None, set())):
        chosen = {} if learn is None else {"learn_outliers": learn}
        learned = aq.quantize(fp, cfg, "accuquant", iters=6, outlier_lr=1e-2, **chosen, **kw)
        b = quant_layers(learned.model)
        for n in with_outliers:
            moved = {k for k, p in start[n].outliers.parameters_to_learn().items()
                     if not torch.equal(p, b[n].outliers.parameters_to_learn()[k])}
            assert moved == moving & set(start[n].outliers.parameters_to_learn()), (learn, n)
        with torch.no_grad():
            out = learned.denoiser()(torch.randn(2, 4, 8, 8), 500, text_conditions(2, seed=3))
        assert torch.isfinite(out).all()


def test_a_stored_start_and_a_checkpoint_carry_the_transforms():
    """AccuQuant's per-step start, taken from the result store, is the per-step model itself:
    its smoothing scales and branches included, not only its quantizers."""
    fp, calib = text_pipeline_and_calibration(4, 4)
    cfg = aq.QuantConfig(weight_bits=4, act_bits=4, outliers="smooth,lowrank", rank=2, attn_bits=8, softmax_bits=8)
    kw = dict(calib=calib, steps=4, progress=False)
    per_step = aq.quantize(fp, cfg, "per-step", iters=4, act_iters=2, samples_per_step=2, **kw)
    start = aq.quantize(fp, cfg, "accuquant", iters=0, init_iters=4, init_act_iters=2, init_samples=2, **kw)
    assert start.quant.method_log["init"].get("cached")
    x, cond = torch.randn(2, 4, 8, 8), text_conditions(2, seed=9)
    with torch.no_grad():
        assert torch.equal(per_step.denoiser()(x, 500, cond), start.denoiser()(x, 500, cond))


def test_the_svdquant_recipe_is_per_step_with_its_options_unless_given():
    from accuquant.methods import resolve_recipe

    method, cfg = resolve_recipe("svdquant", aq.QuantConfig(weight_bits=4, act_bits=4, rank=8))
    assert method == "per-step"
    assert (cfg.weight_group, cfg.act_granularity, cfg.outliers, cfg.rank) == (64, "token", ("smooth", "lowrank"), 8)
    assert resolve_recipe("accuquant", aq.QuantConfig()) == ("accuquant", aq.QuantConfig())
    fp, calib = text_pipeline_and_calibration(4, 4)
    q = aq.quantize(fp, aq.QuantConfig(weight_bits=4, act_bits=4, rank=4), "svdquant", calib=calib, steps=4,
                    progress=False, iters=2, act_iters=2)
    assert q.quant.method == "per-step" and q.quant.method_log["recipe"] == "svdquant"
    assert q.quant.config.outliers == ("smooth", "lowrank") and q.quant.config.rank == 4
    linear = [lyr for lyr in quant_layers(q.model).values() if isinstance(lyr.module, nn.Linear)]
    assert linear and all(lyr.outliers is not None and lyr.outliers.lora_a.shape[0] == 4 for lyr in linear)
