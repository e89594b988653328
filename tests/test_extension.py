"""A new model family and a new method plug in from outside the package: each is one class
registered here, and quantizes end to end without any library module being edited."""

from dataclasses import dataclass

import diffusers
import pytest
import torch

import accuquant as aq
from accuquant.calibrate.protocol import Group, Method, Phase, Unit
from accuquant.config import MethodConfig, option
from accuquant.methods import METHODS, start_from
from accuquant.models import ADAPTERS, Conditions, TextConditional
from accuquant.quant.attention import QuantAttnProcessor
from accuquant.quant.layers import QuantLayer, all_quantizers, quant_layers
from conftest import class_pipeline

W8A8 = aq.QuantConfig(weight_bits=8, act_bits=8)


# ---------------------------------------------------------------------------- a family
class ToyPixArt(TextConditional):
    """A PixArt-style transformer (adaLN-single, cross-attention) on a flow schedule whose
    sigmas shift with the image size, as FLUX's do; its "text encoder" is a seeded table."""

    component = "transformer"
    pipeline_class = "PixArtSigmaPipeline"
    block_types = ("BasicTransformerBlock",)
    keep_fp = ("pos_embed.proj", "proj_out", "adaln_single.*")
    attention_processors = ("AttnProcessor2_0",)
    solver_calls: list = []

    def raw(self, x, t, cond):
        self.require(cond)
        out = self.model(x, encoder_hidden_states=cond["embeds"], timestep=t,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return out[:, : x.shape[1]]  # the learned-variance half is dropped

    def encode(self, prompts, device="cpu"):
        def table(texts):
            seeds = [sum(t.encode()) + len(t) for t in texts]
            return torch.stack([torch.randn(5, 12, generator=torch.Generator().manual_seed(s)) for s in seeds])

        return Conditions(embeds=table(prompts), negative_embeds=table([""] * len(prompts)))

    def solver_options(self, solver, scheduler_config, steps):
        if solver != "flow-euler":
            return {}
        mu = 0.5 + self.sample_shape[1] / 64  # the shift grows with the latent's size
        type(self).solver_calls.append(mu)
        return {"mu": mu}


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setitem(ADAPTERS, "PixArtTransformer2DModel", [ToyPixArt])
    ToyPixArt.solver_calls = []
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=16, caption_channels=12, patch_size=2, norm_type="ada_norm_single",
        use_additional_conditions=False, norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000).eval()
    sched = {**diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config,
             "_class_name": "FlowMatchEulerDiscreteScheduler"}
    return aq.Pipeline(model, sched, denoiser_name="transformer",
                       defaults=aq.SamplingDefaults(guidance_scale=2.0, prompts=["a seven", "a one"]))


def test_a_family_registered_outside_the_package_quantizes_end_to_end(toy_family, tmp_path):
    fp = toy_family
    with pytest.raises(aq.AccuQuantError, match="use_dynamic_shifting"):
        aq.make_solver("flow-euler", fp.scheduler_config, 3)  # without the family's mu the schedule is refused
    ref = fp.sample(4, seed=1, steps=3, progress=False)
    assert ToyPixArt.solver_calls and ToyPixArt.solver_calls[-1] == pytest.approx(0.5 + 8 / 64)

    q = aq.quantize(fp, W8A8, "naive", steps=3, calib_samples=4, progress=False)
    report = q.quant.report
    assert q.quant.calibration["solver"] == "flow-euler"
    assert q.quant.config.keep_fp == ToyPixArt.keep_fp  # the family's defaults, written into the record
    assert set(report.kept_fp) == {"pos_embed.proj", "proj_out", "adaln_single.emb.timestep_embedder.linear_1",
                                   "adaln_single.emb.timestep_embedder.linear_2", "adaln_single.linear"}
    assert len(report.attention) == 4 and not report.attention_fp  # self- and cross-attention of 2 blocks
    assert all(isinstance(q.model.get_submodule(n).processor, QuantAttnProcessor) for n in report.attention)
    assert isinstance(q.model.get_submodule("caption_projection.linear_1"), QuantLayer)
    x = q.sample(4, seed=1, steps=3, progress=False)
    err = (x - ref).pow(2).mean() / ref.pow(2).mean()
    assert 0 < err < 0.05, err  # quantized, and close to FP at W8A8

    q.save(tmp_path / "q")
    back = aq.load(tmp_path / "q")
    assert back.quant.report.attention == report.attention
    assert torch.equal(back.sample(4, seed=1, steps=3, progress=False), x)

    # the calibration methods need nothing else of a family: per-step's blocks are its block_types
    aqq = aq.quantize(fp, W8A8, "accuquant", steps=3, calib_samples=4, progress=False, iters=2, init_iters=2,
                      init_act_iters=1, init_samples=1, batch_size=2)
    blocks = aqq.quant.method_log["init"]["blocks"]
    assert {"transformer_blocks.0", "transformer_blocks.1"} <= set(blocks), list(blocks)


# ---------------------------------------------------------------------------- a method
@dataclass
class ToyConfig(MethodConfig):
    NAME = "toy"
    iters: int = option(6, "optimisation steps", minimum=0)
    lr: float = option(1e-2, "learning rate relative to each step size", positive=True, rate=True)


class Toy(Method):
    """Naive's ranges, then every step size learned against one random step's FP model output."""

    Config = ToyConfig

    def initialise(self, run):
        start_from(run, "naive")

    def units(self, run):
        c = self.config

        def params(resumed):
            return [Group({f"{n}.scale": q.scale for n, q in all_quantizers(run.model).items() if q.enabled}, c.lr,
                          relative=True)]

        def loss(gen, it):
            i = int(torch.randint(run.calib.num_steps, (1,), generator=gen))
            xs, outs, cond = run.trajectories(run.shard(torch.randperm(run.calib.num_samples, generator=gen)[:4]))
            return (run.denoiser(xs[:, i], run.solver.timesteps[i], cond) - outs[:, i]).pow(2).mean()

        class Phases:
            def __enter__(self):
                return [Phase("scales", c.iters, params, loss, curve=True)]

            def __exit__(self, *exc):
                return False

        return [Unit("model", c.iters, lambda index: Phases())]


def test_a_method_registered_outside_the_package_runs_in_the_engine(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", Toy)
    kw = dict(steps=3, calib_samples=6, progress=False)
    naive = aq.quantize(class_pipeline(), W8A8, "naive", **kw)
    toy = aq.quantize(class_pipeline(), W8A8, "toy", iters=10, **kw)
    log = toy.quant.method_log
    assert toy.quant.method == "toy" and log["init"]["method"] == "naive" and log["init"]["cached"] is True
    assert log["evaluations"]["backward"] > 0 and len(log["loss_curve"]) == 1
    moved = [n for n, q in all_quantizers(toy.model).items()
             if not torch.equal(q.scale, all_quantizers(naive.model)[n].scale)]
    assert moved  # it learned
    assert len(quant_layers(toy.model)) == len(quant_layers(naive.model))
    # its options come from its config, like the built-in methods' (and the command line's flags)
    with pytest.raises(aq.AccuQuantError, match="it takes: iters, lr"):
        aq.quantize(class_pipeline(), W8A8, "toy", group_size=2, **kw)
    from accuquant.cli import method_flags

    assert ("toy", "iters") in {(m, f.name) for m, f in method_flags()["iters"]}
