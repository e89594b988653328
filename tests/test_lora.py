"""LoRA on a quantized model: a tiny LoRA trained here on the FP model, applied to the
quantized one on each CPU backend, its strength, fusing, unloading and bad LoRAs."""

import pytest
import torch

import accuquant as aq
from accuquant.errors import AccuQuantError
from accuquant.backends import backends_for
from accuquant.quant.lora import load_lora, parse_lora, unload_lora
from accuquant.quant.layers import freeze_model
from conftest import class_pipeline

#: the layers the test LoRA targets: attention projections, the first up-block resnet's 3x3
#: convs and the time embedding (quantized), and the output conv (kept in FP by default)
TARGETS = ("up_blocks.0.attentions.0.to_q", "up_blocks.0.attentions.0.to_v", "up_blocks.0.attentions.0.to_out.0",
           "up_blocks.0.resnets.0.conv1", "up_blocks.0.resnets.0.conv2", "time_embedding.linear_1", "conv_out")


def _call(pipe, seed: int = 1) -> torch.Tensor:
    den = pipe.denoiser(2.0)
    x = torch.randn(4, *den.sample_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return den(x, torch.tensor(300), pipe.conditions(4, labels=[1, 3, 5, 7]))


def _train_lora(pipe, rank: int = 4, steps: int = 30) -> dict[str, torch.Tensor]:
    """A rank-``rank`` LoRA on TARGETS trained on the FP model to scale its output by 0.9
    for every label (a mild "style", as users' LoRAs are: one that moved the activations
    far out of their calibrated ranges would be clipped by the quantized model's input grids)."""
    g = torch.Generator().manual_seed(0)
    modules = dict(pipe.model.named_modules())
    init = {}
    for name in TARGETS:
        m = modules[name]
        n_in = m.in_features if isinstance(m, torch.nn.Linear) else m.in_channels
        n_out = m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels
        kernel = () if isinstance(m, torch.nn.Linear) else tuple(m.kernel_size)
        init[f"unet.{name}.lora_A.weight"] = 0.1 * torch.randn(rank, n_in, *kernel, generator=g)
        init[f"unet.{name}.lora_B.weight"] = torch.zeros(n_out, rank, *((1, 1) if kernel else ()))
    load_lora(pipe.model, init, "tuning")
    branches = {n: modules[n].lora_adapters["tuning"] for n in TARGETS}
    params = [p for b in branches.values() for p in (b.down, b.up)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-2)
    model = pipe.model
    for i in range(steps):
        x = torch.randn(8, 1, 16, 16, generator=g)
        t = torch.randint(0, 1000, (8,), generator=g)
        labels = torch.randint(0, 11, (8,), generator=g)
        with torch.no_grad():
            for b in branches.values():  # the base model's output
                b.strength = 0.0
            target = 0.9 * model(x, t, class_labels=labels).sample
            for b in branches.values():
                b.strength = 1.0
        loss = (model(x, t, class_labels=labels).sample - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {}
    for name, b in branches.items():
        state[f"unet.{name}.lora_A.weight"] = b.down.detach().clone()
        state[f"unet.{name}.lora_B.weight"] = b.up.detach().clone()
    unload_lora(pipe.model)
    return state


@pytest.fixture(scope="module")
def trained():
    """(FP pipeline, W8A8 quantized pipeline, the trained LoRA)."""
    fp = class_pipeline()
    lora = _train_lora(class_pipeline())
    q = aq.quantize(class_pipeline(), aq.QuantConfig(weight_bits=8, act_bits=8), "naive", steps=4, calib_samples=4,
                    progress=False)
    return fp, q, lora


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_lora_on_the_quantized_model_follows_fp_plus_lora(trained):
    fp, q, lora = trained
    base_fp, base_q = _call(fp), _call(q)
    assert fp.load_lora_weights(lora) == list(TARGETS) and q.load_lora_weights(lora) == list(TARGETS)
    try:
        with_fp, with_q = _call(fp), _call(q)
        effect = _rel(with_fp, base_fp)
        assert effect > 0.05, effect  # the LoRA changes the model's output
        # the quantized model with the LoRA is about as close to FP + LoRA as it is to FP without it
        err, base_err = _rel(with_q, with_fp), _rel(base_q, base_fp)
        assert err < 1.5 * base_err, (err, base_err, effect)
        # the same on the other CPU backends: packed exactly; int8 as close as it is without
        # the LoRA (float rounding moves a few codes across a grid boundary)
        freeze_model(q.model, "packed")
        assert torch.equal(_call(q), with_q)
        if "int8" in backends_for("cpu"):
            freeze_model(q.model, "int8")
            assert _rel(_call(q), with_q) < 1e-2
    finally:
        fp.unload_lora_weights()
        q.unload_lora_weights()
        freeze_model(q.model, "fake")
    assert torch.equal(_call(fp), base_fp) and torch.equal(_call(q), base_q)  # unloaded: as before


def test_strength_scales_the_branch_and_zero_turns_it_off(trained):
    _, q, lora = trained
    base = _call(q)
    q.load_lora_weights(lora, strength=0.0)
    try:
        assert torch.equal(_call(q), base)
        q.set_lora_strength(1.0)
        full = _call(q)
        q.set_lora_strength(0.5)
        half = _call(q)
        assert 0.3 < _rel(half, base) / _rel(full, base) < 0.7
    finally:
        q.unload_lora_weights()


def test_fuse_changes_the_fp_layers_and_unfuse_restores_them_exactly(trained):
    fp, q, lora = trained
    w = fp.model.conv_out.weight.detach().clone()
    fp.load_lora_weights(lora)
    q.load_lora_weights(lora)
    try:
        ref_fp, ref_q = _call(fp), _call(q)
        done = fp.fuse_lora()
        assert sorted(done["fused"]) == sorted(TARGETS) and not done["beside"]
        assert _rel(_call(fp), ref_fp) < 1e-5
        # a quantized layer's weight is codes: its branch stays beside; the FP layer fuses
        done = q.fuse_lora()
        assert done["fused"] == ["conv_out"] and len(done["beside"]) == len(TARGETS) - 1
        assert _rel(_call(q), ref_q) < 1e-5
        fp.unfuse_lora()
        q.unfuse_lora()
        assert torch.equal(fp.model.conv_out.weight, w)
        assert torch.equal(_call(fp), ref_fp) and torch.equal(_call(q), ref_q)
    finally:
        fp.unload_lora_weights()
        q.unload_lora_weights()


def test_a_quantized_model_with_a_lora_is_not_saved(trained, tmp_path):
    _, q, lora = trained
    q.load_lora_weights(lora)
    try:
        with pytest.raises(AccuQuantError, match="a LoRA is loaded"):
            q.save(tmp_path / "m")
    finally:
        q.unload_lora_weights()
    assert not (tmp_path / "m").exists()


def test_bad_loras_are_refused_and_nothing_is_attached(trained):
    fp, _, lora = trained
    other = dict(lora)
    other["unet.mid_block.attentions.0.to_k.lora_A.weight"] = torch.zeros(4, 64)
    other["unet.mid_block.attentions.0.to_k.lora_B.weight"] = torch.zeros(64, 4)
    other["unet.down_blocks.9.conv.lora_A.weight"] = torch.zeros(4, 64)
    other["unet.down_blocks.9.conv.lora_B.weight"] = torch.zeros(64, 4)
    with pytest.raises(AccuQuantError, match="LoRA for another model: down_blocks.9.conv is not a layer"):
        fp.load_lora_weights(other)
    wide = dict(lora)
    wide["unet.up_blocks.0.attentions.0.to_q.lora_B.weight"] = torch.zeros(64, 8)
    with pytest.raises(AccuQuantError, match="LoRA rank does not fit: up_blocks.0.attentions.0.to_q"):
        fp.load_lora_weights(wide)
    narrow = {k: (v[:, :10] if k.endswith("to_q.lora_A.weight") else v) for k, v in lora.items()}
    with pytest.raises(AccuQuantError, match="LoRA for another model: up_blocks.0.attentions.0.to_q is linear 64"):
        fp.load_lora_weights(narrow)
    assert not any(hasattr(m, "lora_adapters") for m in fp.model.modules())


def test_a_saved_lora_file_loads_on_diffusers_own_pipeline(sd_pipeline_dir, tmp_path):
    """The diffusers pipeline from ``to_diffusers()`` takes ``load_lora_weights`` (from a
    safetensors file with a PEFT adapter config) and runs its own loop with the LoRA."""
    from safetensors.torch import save_file

    pipe = aq.load(sd_pipeline_dir)
    g = torch.Generator().manual_seed(0)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    lora = {f"{key}.lora_A.weight": torch.randn(2, 32, generator=g),
            f"{key}.lora_B.weight": torch.randn(32, 2, generator=g)}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(lora, str(path), metadata={"lora_adapter_metadata": '{"r": 2, "lora_alpha": 1}'})
    d = pipe.to_diffusers()
    kw = dict(num_inference_steps=2, output_type="pt", height=32, width=32)
    base = d("a digit", generator=torch.Generator().manual_seed(0), **kw).images
    assert d.load_lora_weights(str(tmp_path)) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    branch = pipe.model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.lora_adapters["default"]
    assert branch.scale == 0.5  # lora_alpha / r
    with_lora = d("a digit", generator=torch.Generator().manual_seed(0), **kw).images
    assert not torch.equal(with_lora, base)
    d.set_adapters(["default"], [0.0])
    assert torch.equal(d("a digit", generator=torch.Generator().manual_seed(0), **kw).images, base)
    d.unload_lora_weights()
    assert not any(hasattr(m, "lora_adapters") for m in pipe.model.modules())


def test_a_files_text_encoder_entries_are_left_out_with_a_warning():
    t = {"unet.a.lora_A.weight": torch.zeros(2, 4), "unet.a.lora_B.weight": torch.zeros(4, 2),
         "unet.a.alpha": torch.tensor(1.0),
         "text_encoder.b.lora_A.weight": torch.zeros(2, 4), "text_encoder.b.lora_B.weight": torch.zeros(4, 2)}
    with pytest.warns(UserWarning, match="2 text-encoder entries left out"):
        out = parse_lora(t)
    assert list(out) == ["a"] and out["a"][2] == 0.5  # alpha / rank
