"""Each model family at its published size on the CPU: naive W8A8, one AccuQuant step, int8 speed.

Memory and time of each, per family.

The tests and the other benchmarks run the families on tiny configurations; this one asks
whether accuquant holds up on the real ones. Each family's published denoiser configuration
(:data:`FAMILIES`, sources in :func:`published_sources`) is random-initialised (seed 0: memory
and speed do not depend on the values) and run without weights files or text encoders: the
conditions are random tensors of the published text encoders' shapes, as accuquant
``Conditions``. Latents are small: 16 x 16 for the image families (any even side runs the
2 x 2 patches, a multiple of 4 SDXL's two down-samplings; 16 keeps some image tokens next to
the hundreds of text tokens), 2 latent frames of 8 x 8 for Wan; guidance is off (one
branch; FLUX.1-dev takes its scale of 3.5 through its guidance embedding, in the same one
evaluation). FLUX.1-dev (12 B parameters) and SD3.5 Large (8 B) do not fit in 24 GB in
float32: they run the published blocks, fewer of them (``--blocks``; by default 1 double- and 2
single-stream blocks, and 3 blocks: the AccuQuant step below holds about 14 bytes per parameter
above the model, and these keep it near 13 GB), with per-block figures and the published
depth's estimate from them.

Per family, each measurement is a fresh process (a clean peak: ``/proc/self/clear_refs``,
as memory_sd.py), in this order:

1. ``build``: parameters and the peak resident memory of building the model (then, not
   measured: calibration trajectories of 2 samples x 4 steps and W4A8 min-max ranges for 3);
2. ``naive``: ``accuquant.quantize`` with the naive method at W8A8 (8-bit weights symmetric,
   min-max ranges) on an in-memory ``accuquant.Pipeline`` from its own 2 x 4-step
   trajectories, then one 4-step sampling run of the quantized model: seconds and peak of each
   (the quantized model is saved for 4);
3. ``step``: one AccuQuant optimisation step (W4A8, min-max start, checkpoint gradient, one
   trajectory) at M = 1 and M = 4: seconds and peak above the resident memory before it (the
   wrapped model); target: M = 4 within 1.15x of M = 1;
4. ``speed``: the W8A8 model loaded onto the ``int8`` backend (``accuquant.load(...,
   backend="int8")``) against the float32 model, float32 and bf16 autocast, on the same input:
   medians of ``--repeats`` denoiser calls, timed in turn in one process
   (``accuquant.eval.speed.measure_pipelines``, as int8_speed.py), and per-block times.

A family whose adapter is not registered is reported as not run; a failed measurement is
reported and the family's later ones that need it are skipped. A measurement whose resident
memory passes ``--max-rss`` (default: 85% of the memory available as it starts) is stopped and
reported as such, before the system's out-of-memory killer picks a process (perhaps another
job's). ``--fixed-codes`` adds the AccuQuant step with the start's weight codes fixed (its
default after per-step's learned rounding), which holds less. Times are only as good as the
machine is quiet: with other jobs on its cores, oneDNN's threads wait for each other.

    python benchmarks/families_full_size.py                       # results/families_full_size.{json,md}
    python benchmarks/families_full_size.py --families flux --blocks 1 --out /tmp/flux   # a quick check
    python benchmarks/families_full_size.py --families sd35-medium --blocks sd35-medium=2
    python benchmarks/families_full_size.py --step-blocks sdxl=1,sana=4   # the step, where it does not fit, smaller

Results of families not run again are kept in the json and the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    ROOT,
    accuquant_step,
    cpu_name,
    measure_env,
    reset_peak,
    rss_mb,
    save_minmax_quantizers,
    settings,
    wrapped_from,
)

from accuquant.io.files import atomic_path

RESULTS = ROOT / "benchmarks" / "results"
STEPS = 4
CALIB_SAMPLES = 2
MS = (1, 4)
W8A8 = {"weight_bits": 8, "act_bits": 8, "weight_symmetric": True, "weight_init": "minmax", "act_init": "minmax"}
W4A8 = {"weight_bits": 4, "act_bits": 8, "weight_init": "minmax", "act_init": "minmax"}
KEY = "families-full-size"

FAMILIES: dict[str, dict] = {
    "sdxl": {
        "title": "SDXL base 1.0 UNet",
        "repo": "stabilityai/stable-diffusion-xl-base-1.0",
        "file": "unet/config.json",
        "class": "UNet2DConditionModel",
        "config": {
            "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
            "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False,
            "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
            "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
            "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
            "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
            "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
            "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
            "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
            "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
            "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
            "use_linear_projection": True,
        },
        "scheduler": {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                      "beta_start": 0.00085, "interpolation_type": "linear", "num_train_timesteps": 1000,
                      "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
                      "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
                      "trained_betas": None, "use_karras_sigmas": False},
        "text": {"embeds": [77, 2048], "pooled": [1280]},
        "text_source": "CLIP ViT-L and OpenCLIP bigG penultimate states concatenated (77 x 2048), bigG's pooled "
                       "projection (1280); time ids built by the adapter",
        "latent": {"sample_size": 16},
        "verified": "every value as in several public copies of the file, which agree",
        # reduced (--step-blocks sdxl=N): at most N transformer layers in each attention block
        "layers": "transformer_layers_per_block",
    },
    "flux": {
        "title": "FLUX.1-dev",
        "repo": "black-forest-labs/FLUX.1-dev",
        "file": "transformer/config.json",
        "class": "FluxTransformer2DModel",
        "config": {"attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True,
                   "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
                   "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768},
        "stacks": {"transformer_blocks": ["num_layers", 1, "double-stream"],
                   "single_transformer_blocks": ["num_single_layers", 2, "single-stream"]},
        "blocks": 1,
        "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
                      "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000,
                      "shift": 3.0, "use_dynamic_shifting": True},
        "text": {"embeds": [512, 4096], "pooled": [768]},
        "text_source": "T5-XXL, FluxPipeline's 512 tokens; CLIP ViT-L pooled (768)",
        "latent": {"sample_size": 16},
        "guidance": 3.5,
        "verified": "every value as in several public copies of the file, which agree",
    },
    "pixart-sigma": {
        "title": "PixArt-Σ XL/2 1024-MS",
        "repo": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        "file": "transformer/config.json",
        "class": "PixArtTransformer2DModel",
        "config": {"activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 72,
                   "attention_type": "default", "caption_channels": 4096, "cross_attention_dim": 1152,
                   "double_self_attention": False, "dropout": 0.0, "in_channels": 4, "interpolation_scale": 2,
                   "norm_elementwise_affine": False, "norm_eps": 1e-06, "norm_num_groups": 32,
                   "norm_type": "ada_norm_single", "num_attention_heads": 16, "num_embeds_ada_norm": 1000,
                   "num_layers": 28, "num_vector_embeds": None, "only_cross_attention": False, "out_channels": 8,
                   "patch_size": 2, "sample_size": 128, "upcast_attention": False,
                   "use_additional_conditions": False, "use_linear_projection": False},
        "stacks": {"transformer_blocks": ["num_layers", 1, "transformer"]},
        "scheduler": {"_class_name": "DPMSolverMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                      "beta_start": 0.0001, "num_train_timesteps": 1000, "prediction_type": "epsilon",
                      "steps_offset": 0, "timestep_spacing": "linspace"},
        "text": {"embeds": [300, 4096]},
        "text_source": "T5-XXL, PixArtSigmaPipeline's 300 tokens",
        "latent": {"sample_size": 16},
        "verified": "the file itself not found: values from diffusers' scripts/convert_pixart_sigma_to_diffusers.py "
                    "at image size 1024 (interpolation_scale 2; use_additional_conditions false, its default without "
                    "--micro_condition) and PixArtTransformer2DModel's defaults; the scheduler's betas are "
                    "DPMSolverMultistepScheduler's defaults, as that script saves it",
    },
    "sana": {
        "title": "Sana 1600M 1024px",
        "repo": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
        "file": "transformer/config.json",
        "class": "SanaTransformer2DModel",
        "config": {"attention_bias": False, "attention_head_dim": 32, "caption_channels": 2304,
                   "cross_attention_dim": 2240, "cross_attention_head_dim": 112, "dropout": 0.0, "in_channels": 32,
                   "interpolation_scale": None, "mlp_ratio": 2.5, "norm_elementwise_affine": False, "norm_eps": 1e-06,
                   "num_attention_heads": 70, "num_cross_attention_heads": 20, "num_layers": 20, "out_channels": 32,
                   "patch_size": 1, "sample_size": 32},
        "stacks": {"transformer_blocks": ["num_layers", 1, "transformer"]},
        "scheduler": {"_class_name": "DPMSolverMultistepScheduler", "flow_shift": 3.0, "num_train_timesteps": 1000,
                      "prediction_type": "flow_prediction", "use_flow_sigmas": True},
        "text": {"embeds": [300, 2304]},
        "text_source": "Gemma-2 2B, SanaPipeline's 300 tokens",
        "latent": {"sample_size": 16},
        "verified": "the file itself not found: values from diffusers' scripts/convert_sana_to_diffusers.py for "
                    "SanaMS_1600M_P1_D20 at 1024 px (no qk_norm, interpolation_scale None, sample_size 32, flow "
                    "shift 3.0), which a public test's copy of a Sana 1600M config matches but for qk_norm (Sana 1.5)",
    },
    "sd35-medium": {
        "title": "SD3.5 Medium",
        "repo": "stabilityai/stable-diffusion-3.5-medium",
        "file": "transformer/config.json",
        "class": "SD3Transformer2DModel",
        "config": {"attention_head_dim": 64, "caption_projection_dim": 1536,
                   "dual_attention_layers": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], "in_channels": 16,
                   "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24, "out_channels": 16,
                   "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                   "sample_size": 128},
        "stacks": {"transformer_blocks": ["num_layers", 1, "transformer"]},
        "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
        "text": {"embeds": [333, 4096], "pooled": [2048]},
        "text_source": "CLIP-L + CLIP-G (77 tokens) then T5-XXL (StableDiffusion3Pipeline's 256 tokens): 333 x "
                       "4096; the CLIPs' pooled projections (2048)",
        "latent": {"sample_size": 16},
        "verified": "every value as in several public copies of the file, which agree",
    },
    "sd35-large": {
        "title": "SD3.5 Large",
        "repo": "stabilityai/stable-diffusion-3.5-large",
        "file": "transformer/config.json",
        "class": "SD3Transformer2DModel",
        "config": {"attention_head_dim": 64, "caption_projection_dim": 2432, "in_channels": 16,
                   "joint_attention_dim": 4096, "num_attention_heads": 38, "num_layers": 38, "out_channels": 16,
                   "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "qk_norm": "rms_norm",
                   "sample_size": 128},
        "stacks": {"transformer_blocks": ["num_layers", 1, "transformer"]},
        "blocks": 3,
        "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
        "text": {"embeds": [333, 4096], "pooled": [2048]},
        "text_source": "as SD3.5 Medium",
        "latent": {"sample_size": 16},
        "verified": "public copies of the file agree on every value but pos_embed_max_size: 192 in most (and in a "
                    "note that the checkpoint holds 36864 = 192^2 positions), 384 or 96 in one each; no "
                    "dual_attention_layers",
    },
    "wan": {
        "title": "Wan 2.1 T2V 1.3B",
        "repo": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        "file": "transformer/config.json",
        "class": "WanTransformer3DModel",
        "config": {"added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06,
                   "ffn_dim": 8960, "freq_dim": 256, "image_dim": None, "in_channels": 16, "num_attention_heads": 12,
                   "num_layers": 30, "out_channels": 16, "patch_size": [1, 2, 2], "pos_embed_seq_len": None,
                   "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096},
        "stacks": {"blocks": ["num_layers", 1, "transformer"]},
        "scheduler": {"_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0, "num_train_timesteps": 1000,
                      "prediction_type": "flow_prediction", "use_flow_sigmas": True},
        "text": {"embeds": [512, 4096]},
        "text_source": "umT5-XXL, WanPipeline's 512 tokens",
        "latent": {"sample_size": 8, "num_frames": 2},
        "verified": "the file itself not found: values from diffusers' scripts/convert_wan_to_diffusers.py "
                    "(Wan-T2V-1.3B); image_dim, pos_embed_seq_len and rope_max_seq_len are the class's defaults; "
                    "the scheduler's flow_shift 3.0 is WanPipeline's documented 480p value, not seen in its file",
    },
}


def published_sources() -> dict[str, str]:
    """Where each family's configuration in FAMILIES is published: the model repository's
    denoiser config.json on the Hugging Face hub (SDXL: stabilityai/stable-diffusion-xl-base-1.0
    unet/config.json; FLUX.1-dev: black-forest-labs/FLUX.1-dev transformer/config.json;
    PixArt-Σ: PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json; Sana:
    Efficient-Large-Model/Sana_1600M_1024px_diffusers transformer/config.json; SD3.5 Medium and
    Large: stabilityai/stable-diffusion-3.5-medium and -large transformer/config.json; Wan:
    Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json), with the scheduler's config from
    the same repository's scheduler/scheduler_config.json. How far each value could be checked
    without the hub is each family's ``verified``, written into the results' notes."""
    return {name: f"{f['repo']} {f['file']}" for name, f in FAMILIES.items()}


# ---------------------------------------------------------------- the model of a family


def config_of(name: str, blocks: int | None) -> dict:
    """The published configuration, with ``blocks`` blocks per stack unit where given (FLUX:
    ``blocks`` double-stream and ``2 * blocks`` single-stream, the published 19:38)."""
    fam = FAMILIES[name]
    cfg = dict(fam["config"])
    if blocks and "layers" in fam:
        cfg[fam["layers"]] = [min(blocks, n) for n in cfg[fam["layers"]]]
    elif blocks:
        for key, mult, _ in fam["stacks"].values():
            cfg[key] = blocks * mult
        if "dual_attention_layers" in cfg:
            cfg["dual_attention_layers"] = [i for i in cfg["dual_attention_layers"] if i < cfg["num_layers"]]
    return cfg


def build(name: str, blocks: int | None):
    import diffusers
    import torch

    torch.manual_seed(0)  # from_config, as diffusers reads a config.json: keys of another class's are left out
    return getattr(diffusers, FAMILIES[name]["class"]).from_config(config_of(name, blocks)).eval()


def pipeline(name: str, model):
    """An in-memory accuquant pipeline of ``model``: the family's adapter, scheduler and latent size."""
    import accuquant as aq
    from accuquant.models import adapter_class

    fam = FAMILIES[name]
    return aq.Pipeline(model, dict(fam["scheduler"]), denoiser_name=adapter_class(model).component,
                       defaults=aq.SamplingDefaults(fam.get("guidance", 1.0), **fam["latent"]))


def conditions(name: str, pipe, n: int):
    """``n`` random text conditions of the family's published shapes, under the keys its adapter
    reads (an attention mask its adapter asks for: every token valid)."""
    import torch

    import accuquant as aq

    fam = FAMILIES[name]
    keys = getattr(pipe.denoiser(), "condition_keys", tuple(fam["text"]))
    g = torch.Generator().manual_seed(n)
    tokens = fam["text"]["embeds"][0]
    out = {}
    for k in dict.fromkeys([*fam["text"], *keys]):
        if k in fam["text"]:
            out[k] = torch.randn(n, *fam["text"][k], generator=g)
        elif "mask" in k:
            out[k] = torch.ones(n, tokens)
        else:
            raise RuntimeError(f"the {name} adapter reads condition {k!r}, which this benchmark does not make")
    return aq.Conditions(out)


def block_lists(model) -> dict[str, list]:
    """The model's top-level stacks of one block class (transformer blocks), by attribute name."""
    from torch import nn

    return {n: list(m) for n, m in model.named_children()
            if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1
            and type(m[0]).__name__.endswith("Block")}


def has_adapter(name: str) -> bool:
    """Whether a registered adapter takes this family's model (looked up on its config alone)."""
    from types import SimpleNamespace

    from accuquant.models import ADAPTERS

    stub = SimpleNamespace(config=SimpleNamespace(**FAMILIES[name]["config"]))
    for cls in ADAPTERS.get(FAMILIES[name]["class"], []):
        try:
            if cls.matches(stub):
                return True
        except (AttributeError, KeyError, TypeError):  # it needs more than the config: let the run tell
            return True
    return False


# ---------------------------------------------------------------- the measurements (child processes)


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _block_ms(variants: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Per variant (``name: (model, call)``), the median milliseconds of one block of each of
    its model's stacks, over its blocks and ``repeats`` calls, the variants called in turn."""
    times: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    handles = []
    for v, (model, _) in variants.items():
        for name, blocks in block_lists(model).items():
            spent = times[v].setdefault(name, [])
            for b in blocks:
                start: dict = {}
                handles.append(b.register_forward_pre_hook(
                    lambda m, a, s=start: s.__setitem__("t", time.perf_counter())))
                handles.append(b.register_forward_hook(
                    lambda m, a, o, s=start, spent=spent: spent.append(time.perf_counter() - s["t"])))
    try:
        for _ in range(repeats):
            for _, call in variants.values():
                call()
    finally:
        for h in handles:
            h.remove()
    return {v: {k: round(1e3 * statistics.median(t), 3) for k, t in per.items() if t} for v, per in times.items()}


def child(kind: str, name: str, folder: Path, blocks: int | None, value: str, repeats: int) -> dict:
    import torch

    import accuquant as aq

    torch.set_grad_enabled(False)
    out: dict = {"kind": kind, "value": value}
    if kind == "build":
        before = reset_peak()
        t0 = time.perf_counter()
        model = build(name, blocks)
        out.update(seconds=time.perf_counter() - t0, rss_before_mb=before, peak_mb=rss_mb("VmHWM") - before,
                   params=_params(model),
                   stacks={k: {"blocks": len(v), "params_per_block": statistics.fmean(_params(b) for b in v)}
                           for k, v in block_lists(model).items()})
        if blocks and FAMILIES[name].get("stacks"):  # the published depth's parameters, counted on the meta device (nothing allocated)
            import diffusers

            try:
                with torch.device("meta"):
                    full = getattr(diffusers, FAMILIES[name]["class"]).from_config(FAMILIES[name]["config"])
                out["published_params"] = _params(full)
            except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
                out["published_params_error"] = f"{type(e).__name__}: {e}"
        pipe = pipeline(name, model)  # data for the other processes, not measured
        solver = pipe.solver(STEPS)
        t0 = time.perf_counter()
        calib = aq.collect_trajectories(pipe.denoiser(), solver, CALIB_SAMPLES,
                                        cond=conditions(name, pipe, CALIB_SAMPLES), batch_size=CALIB_SAMPLES,
                                        progress=False, path=folder / "calib.safetensors")
        out["collect_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        save_minmax_quantizers(pipe, solver, calib, W4A8, folder / "quantizers.safetensors", KEY)
        out["setup_s"] = time.perf_counter() - t0
        return out
    if kind == "naive":
        pipe = pipeline(name, build(name, blocks))
        cond = conditions(name, pipe, CALIB_SAMPLES)
        before = reset_peak()
        t0 = time.perf_counter()
        calib = aq.collect_trajectories(pipe.denoiser(), pipe.solver(STEPS), CALIB_SAMPLES, cond=cond,
                                        batch_size=CALIB_SAMPLES, progress=False)
        q = aq.quantize(pipe, aq.QuantConfig(**W8A8), "naive", calib=calib, steps=STEPS, batch_size=CALIB_SAMPLES,
                        progress=False, inplace=True, use_cache=False)
        out["quantize"] = {"seconds": time.perf_counter() - t0, "rss_before_mb": before,
                           "peak_mb": rss_mb("VmHWM") - before, "timing_s": q.quant.timing_s}
        del calib
        den = q.denoiser()
        noise = torch.randn(1, *den.sample_shape, generator=torch.Generator().manual_seed(0))
        before = reset_peak()
        t0 = time.perf_counter()
        x = aq.run_trajectory(den, q.solver(STEPS), noise, cond.index(torch.tensor([0])))
        out["sample"] = {"seconds": time.perf_counter() - t0, "rss_before_mb": before,
                         "peak_mb": rss_mb("VmHWM") - before, "finite": bool(torch.isfinite(x).all())}
        q.save(folder / "w8a8")
        return out
    if kind == "step":
        pipe = pipeline(name, build(name, blocks))
        den = wrapped_from(pipe, W4A8, folder / "quantizers.safetensors", KEY)
        calib = aq.Trajectories.load(folder / "calib.safetensors")
        m, _, codes = value.partition("-")
        return {**out, **accuquant_step(pipe, den, pipe.solver(STEPS), calib, int(m), codes == "codes")}
    if kind == "speed":
        from accuquant.eval.speed import measure_pipelines

        reset_peak()
        quant = aq.load(folder / "w8a8", backend="int8")  # first: its float weights are freed as it loads
        fp = pipeline(name, build(name, blocks))
        cond = conditions(name, fp, 1)
        r = measure_pipelines({"int8": quant}, fp, batch=1, steps=STEPS, repeats=repeats, whole_sample=False,
                              cond=cond)
        den_fp, den_q = fp.denoiser(), quant.denoiser()
        x = torch.randn(1, *den_fp.sample_shape, generator=torch.Generator().manual_seed(0))
        t = quant.solver(STEPS).timesteps[STEPS // 2]
        with torch.inference_mode():
            per_block = _block_ms({"fp32": (fp.model, lambda: den_fp(x, t, cond)),
                                   "int8": (quant.model, lambda: den_q(x, t, cond))}, repeats)
        return {**out, **r, "per_block_ms": per_block, "process_peak_mb": rss_mb("VmHWM")}
    raise ValueError(kind)


# ---------------------------------------------------------------- the parent: families in turn


def _mem_available_mb() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(next(ln for ln in text.splitlines() if ln.startswith("MemAvailable")).split()[1]) / 1024


def _child_rss_mb(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(ln.split()[1]) / 1024 for ln in text.splitlines() if ln.startswith("VmRSS")), 0.0)


def _run(kind: str, name: str, folder: Path, blocks: int | None, value: str, args) -> dict:
    """One measurement in a child process, stopped when its resident memory passes the limit
    (``--max-rss``; default 85% of the memory available as it starts), before the system's
    out-of-memory killer picks a process, perhaps another job's."""
    cmd = [sys.executable, __file__, "--child", kind, name, str(folder), value, "--child-blocks", str(blocks or 0),
           "--threads", str(args.threads), "--repeats", str(args.repeats)]
    limit = 1024 * args.max_rss if args.max_rss else 0.85 * _mem_available_mb()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, text=True, env=measure_env())
        stopped = False
        while proc.poll() is None:
            if _child_rss_mb(proc.pid) > limit:
                proc.kill()
                stopped = True
                proc.wait()
                break
            time.sleep(0.2)
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read(), se.read()
    if stopped:
        return {"error": f"stopped: its resident memory passed {limit / 1024:.1f} GB (--max-rss)",
                "stderr_tail": stderr[-3000:]}
    if proc.returncode != 0:
        why = "killed (out of memory?)" if proc.returncode == -9 else f"exit {proc.returncode}"
        tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or [""]
        return {"error": f"{why}: {tail[0][:400]}", "stderr_tail": stderr[-3000:]}
    r = json.loads(stdout.strip().splitlines()[-1])
    r["process_s"] = round(time.perf_counter() - t0, 1)
    return r


def _rounded(x):
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def run_family(name: str, blocks: int | None, args, step_blocks: int | None = None) -> dict:
    """One family's measurements; the AccuQuant step at ``step_blocks`` (its own build and
    calibration data) where given and different from ``blocks``."""
    fam = FAMILIES[name]
    step_blocks = step_blocks if step_blocks is not None else blocks
    entry: dict = {"title": fam["title"], "source": f"{fam['repo']} {fam['file']}", "class": fam["class"],
                   "verified": fam["verified"], "blocks": blocks, "config": config_of(name, blocks),
                   "latent": fam["latent"], "text": fam["text"], "text_source": fam["text_source"],
                   "guidance": fam.get("guidance", 1.0), "steps": STEPS, "calib_samples": CALIB_SAMPLES,
                   "threads": args.threads, "repeats": args.repeats}
    if args.skip:
        entry["skipped"] = [k for k in args.skip.split(",") if k]
    if step_blocks != blocks:
        entry["step_blocks"] = step_blocks
        entry["step_config"] = config_of(name, step_blocks)
    if not has_adapter(name):
        entry["status"] = "not run: no adapter"
        print(f"{name}: not run: no adapter", flush=True)
        return entry
    t_family = time.perf_counter()
    errors = {}
    with tempfile.TemporaryDirectory(prefix=f"families-{name}-") as tmp:
        steps = [str(m) for m in MS] + ([f"{m}-codes" for m in MS] if args.fixed_codes else [])
        own = step_blocks != blocks
        jobs = [("build", "-"), *([("step_build", "-")] if own else []), ("naive", "-"), *[("step", v) for v in steps],
                ("speed", "-")]
        jobs = [(k, v) for k, v in jobs if k not in args.skip.split(",")]
        needs = {"naive": [], "build": [], "step_build": [], "step": ["step_build" if own else "build"],
                 "speed": ["naive"]}
        for kind, value in jobs:
            label = kind if value == "-" else f"{kind} M={value.replace('-codes', ' (fixed codes)')}"
            folder, n_blocks = (Path(tmp) / "step", step_blocks) if kind.startswith("step") and own else (Path(tmp), blocks)
            folder.mkdir(exist_ok=True)
            missing = [n for n in needs[kind] if n in errors]
            if missing:
                errors[label] = f"skipped: {missing[0]} failed"
                continue
            r = _run(kind.removeprefix("step_"), name, folder, n_blocks, value, args)
            print(f"{name} {label}: " + json.dumps(_rounded({k: v for k, v in r.items() if k != "stderr_tail"}))[:600],
                  flush=True)
            if "error" in r:
                errors[kind if kind != "step" else label] = r["error"]
                entry.setdefault("stderr", {})[label] = r["stderr_tail"]
                continue
            if kind == "step":
                entry.setdefault("step", {})[value] = _rounded(r)
            else:
                entry[kind] = _rounded(r)
    steps = entry.get("step", {})
    if "1" in steps and "4" in steps:
        entry["step_m4_vs_m1"] = round(steps["4"]["peak_mb"] / steps["1"]["peak_mb"], 3)
    if "1-codes" in steps and "4-codes" in steps:
        entry["step_codes_m4_vs_m1"] = round(steps["4-codes"]["peak_mb"] / steps["1-codes"]["peak_mb"], 3)
    if "speed" in entry:
        v = entry["speed"]["variants"]
        q = next(k for k in v if k.endswith("-int8"))
        entry["int8"] = {"vs_fp32": v[q]["call_speedup"],
                         "vs_bf16": round(v[q]["call_speedup"] / v["bf16"]["call_speedup"], 3) if "bf16" in v else None}
    if blocks and fam.get("stacks") and "build" in entry:
        entry["published"] = _published_estimate(name, entry)
    entry["errors"] = errors
    entry["status"] = "ok" if not errors else "partly failed"
    entry["wall_s"] = round(time.perf_counter() - t_family, 1)
    return entry


def _published_estimate(name: str, entry: dict) -> dict:
    """The published depth from the per-block figures: parameters (counted exactly where the
    meta device allowed), float32 weights, and float32 and int8 call times (measured call plus
    the missing blocks at their measured per-block time)."""
    fam, b = FAMILIES[name], entry["build"]
    stacks = b["stacks"]
    missing = {k: fam["config"][key] - stacks[k]["blocks"] for k, (key, *_) in fam["stacks"].items() if k in stacks}
    params = b.get("published_params") or b["params"] + sum(n * stacks[k]["params_per_block"] for k, n in missing.items())
    est = {"blocks": {k: fam["config"][key] for k, (key, *_) in fam["stacks"].items()}, "params": params,
           "fp32_weights_gb": round(4 * params / 1e9, 2)}
    if "speed" in entry:
        per, v = entry["speed"]["per_block_ms"], entry["speed"]["variants"]
        q = next(k for k in v if k.endswith("-int8"))
        for kind, variant in (("fp32", "fp32"), ("int8", q)):
            est[f"{kind}_call_ms"] = round(v[variant]["call"]["median_ms"]
                                           + sum(n * per[kind].get(k, 0.0) for k, n in missing.items()), 1)
        est["int8_vs_fp32"] = round(est["fp32_call_ms"] / est["int8_call_ms"], 3)
    return est


# ---------------------------------------------------------------- the results


def _mb(x) -> str:
    return f"{x:,.0f}" if isinstance(x, (int, float)) else "-"


def _cell(r: dict | None, above: bool = False) -> str:
    """``seconds / peak MB`` of a measurement: the process's whole peak, or (``above``) the peak
    above the resident memory before it."""
    if not r:
        return "failed"
    return f"{r['seconds']:.1f} / {_mb(r['peak_mb'] if above else r['rss_before_mb'] + r['peak_mb'])}"


def table(doc: dict) -> str:
    fams = doc["families"]
    lines = [(f"Written by benchmarks/families_full_size.py on {doc['cpu']} ({doc['threads']} threads; torch "
             f"{doc['torch']}, diffusers {doc['diffusers']}, accuquant {doc['accuquant']}). Each family's published "
             "denoiser configuration, random-initialised, on the CPU in float32, without weights files or text "
             f"encoders (random conditions of the published text shapes); {STEPS} steps, {CALIB_SAMPLES} "
             "calibration trajectories, guidance off (FLUX.1-dev: 3.5 through its guidance embedding, one "
             "evaluation). One fresh process per measurement; peaks are resident memory (MB): the process's whole "
             "peak for the build, quantization and sampling, the peak above the wrapped model for the AccuQuant "
             "step (as memory_sd.py). Families marked with a block count run the published blocks, fewer of them."),
             "", ("| family | configuration run | latent | params (M) | build: s / peak | naive W8A8 (collect + "
             "calibrate + freeze): s / peak | its 4-step sample: s / peak | AccuQuant step M=1: s / above model | "
             "M=4: s / above model | M=4 / M=1 |"), "|" + " --- |" * 10]
    for name, e in fams.items():
        depth = _depth(name, e)
        lat = e["latent"]
        latent = (f"{lat['num_frames']}x{lat['sample_size']}x{lat['sample_size']}" if "num_frames" in lat
                  else f"{lat['sample_size']}x{lat['sample_size']}")
        if e["status"].startswith("not run"):
            lines.append(f"| {e['title']} | {depth} | {latent} | {e['status']} |" + " |" * 6)
            continue
        b, n, s = e.get("build"), e.get("naive") or {}, e.get("step", {})
        params = f"{b['params'] / 1e6:,.0f}" if b else "failed"
        at = f" ({_depth(name, {**e, 'blocks': e['step_blocks'], 'config': e['step_config']})})" if "step_blocks" in e else ""
        steps = ((_cell(s.get('1'), True) + at, _cell(s.get('4'), True) + at) if "step" not in e.get("skipped", [])
                 else ("not measured", "not measured"))
        lines.append(f"| {e['title']} | {depth} | {latent} | {params} | {_cell(b)} | {_cell(n.get('quantize'))} | "
                     f"{_cell(n.get('sample'))} | {steps[0]} | {steps[1]} | {e.get('step_m4_vs_m1', '-')} |")
    codes = {n: e for n, e in fams.items() if any(k.endswith("-codes") for k in e.get("step", {}))}
    if codes:
        lines += ["", ("The AccuQuant step with the start's weight codes fixed (AccuQuant's default after per-step's "
                  "learned rounding; --fixed-codes):"), "",
                  "| family | M=1: s / above model | M=4: s / above model | M=4 / M=1 |", "|" + " --- |" * 4]
        for name, e in codes.items():
            s = e["step"]
            lines.append(f"| {e['title']} ({_depth(name, e)}) | {_cell(s.get('1-codes'), True)} | "
                         f"{_cell(s.get('4-codes'), True)} | {e.get('step_codes_m4_vs_m1', '-')} |")
    lines += ["", ("int8 backend (W8A8, weights symmetric) against the float32 model on the same input, one unguided "
              "denoiser call (batch 1), medians in one process, variants timed in turn; speed-up: the other's median "
              "over int8's."), "",
              ("| family | fp32 (ms) | bf16 autocast (ms) | int8 (ms) | int8 speed-up vs fp32 | vs bf16 | layers on int8 "
              "| speed process peak |"), "|" + " --- |" * 8]
    for name, e in fams.items():
        if "speed" not in e:
            continue
        v = e["speed"]["variants"]
        q = next(k for k in v if k.endswith("-int8"))
        where = e["speed"]["placement"]["int8"]
        on = where.get("int8", 0)
        lines.append(f"| {e['title']} ({_depth(name, e)}) | {v['fp32']['call']['median_ms']:.0f} | "
                     f"{v['bf16']['call']['median_ms']:.0f} | {v[q]['call']['median_ms']:.0f} | "
                     f"{e['int8']['vs_fp32']:.2f}x | {e['int8']['vs_bf16']:.2f}x | {on}/{sum(where.values())} | "
                     f"{_mb(e['speed']['process_peak_mb'])} |")
    reduced = {n: e for n, e in fams.items() if e.get("blocks") and "build" in e}
    if reduced:
        lines += ["", ("Per block (the families run with fewer blocks), and the published depth estimated from it: "
                  "parameters counted exactly, call times as the measured call plus the missing blocks at their "
                  "median measured time."), "",
                  ("| family | stack | blocks run / published | params per block (M) | fp32 ms per block | "
                  "int8 ms per block | published: params (B), fp32 weights (GB) | published: fp32 / int8 call (ms) |"),
                  "|" + " --- |" * 8]
        for name, e in reduced.items():
            fam, est = FAMILIES[name], e.get("published", {})
            per = e.get("speed", {}).get("per_block_ms", {})
            for k, st in e["build"]["stacks"].items():
                full = est.get("blocks", {}).get(k, "?")
                calls = (f"{est['fp32_call_ms']:,.0f} / {est['int8_call_ms']:,.0f}" if "fp32_call_ms" in est else "-")
                lines.append(f"| {fam['title']} | {k} | {st['blocks']} / {full} | {st['params_per_block'] / 1e6:.1f} | "
                             f"{per.get('fp32', {}).get(k, '-')} | {per.get('int8', {}).get(k, '-')} | "
                             f"{est.get('params', 0) / 1e9:.2f}, {est.get('fp32_weights_gb', '-')} | {calls} |")
    lines += ["", "Notes:", ""]
    for name, e in fams.items():
        text = ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in e["text"].items())
        lines.append(f"* {e['title']}: {e['source']}; {e['verified']}. Text: {text} ({e['text_source']}).")
        for label, why in e.get("errors", {}).items():
            lines.append(f"  * {label}: {why}")
        if e.get("skipped"):
            lines.append(f"  * not measured (to fit the time at hand): {', '.join(e['skipped'])}")
    return "\n".join(lines) + "\n"


def _depth(name: str, e: dict) -> str:
    fam = FAMILIES[name]
    if "layers" in fam and e.get("blocks"):
        key = fam["layers"]
        return f"{key} {e['config'][key]} (of {fam['config'][key]})"
    if not fam.get("stacks"):
        return "published"
    counts = [(e["config"][key], label) for key, _, label in fam["stacks"].values()]
    text = " + ".join(f"{n} {label}" for n, label in counts) + (" block" if sum(n for n, _ in counts) == 1 else " blocks")
    if not e.get("blocks"):
        return f"published ({text})"
    full = " + ".join(str(fam["config"][key]) for key, *_ in fam["stacks"].values())
    return f"{text} (of {full})"


def _blocks_for(spec: str | None) -> dict[str, int | None]:
    """Blocks per family: the reduced families' defaults, overridden by ``--blocks`` (``N``: every
    transformer family; ``family=N,...``: those)."""
    out = {n: f.get("blocks") for n, f in FAMILIES.items()}
    if not spec:
        return out
    if "=" not in spec:
        return {n: (int(spec) if f.get("stacks") or "layers" in f else None) for n, f in FAMILIES.items()}
    for kv in spec.split(","):
        k, v = kv.split("=")
        if k not in FAMILIES or not (FAMILIES[k].get("stacks") or "layers" in FAMILIES[k]):
            raise SystemExit(f"--blocks: {k!r} is not a family with block stacks")
        out[k] = int(v) or None
    return out


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES), help=f"of {', '.join(FAMILIES)}")
    p.add_argument("--blocks", default=None,
                   help="N: every transformer family runs N blocks (FLUX: N double + 2N single); or family=N,... "
                        "(0: published). Default: FLUX 1 (+ 2 single), SD3.5 Large 3, the others published")
    p.add_argument("--step-blocks", default="",
                   help="family=N,...: the AccuQuant step of those families with N blocks (SDXL: at most N transformer "
                        "layers per attention block), on its own build and data, the rest as --blocks")
    p.add_argument("--skip", default="", help="measurements not taken, comma-separated (speed: no int8/fp32/bf16 "
                   "timing, the longest part at full size)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3, help="timed denoiser calls per variant")
    p.add_argument("--fixed-codes", action="store_true",
                   help="also the AccuQuant step with the start's weight codes fixed (its default after per-step's "
                        "learned rounding: the weights' codes are not recomputed, so less memory)")
    p.add_argument("--max-rss", type=float, default=None,
                   help="GB: stop a measurement whose resident memory passes it (default: 85%% of the memory "
                        "available as it starts)")
    p.add_argument("--out", default=str(RESULTS / "families_full_size"))
    p.add_argument("--child", nargs=4, metavar=("KIND", "FAMILY", "FOLDER", "VALUE"), help=argparse.SUPPRESS)
    p.add_argument("--child-blocks", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        kind, name, folder, value = args.child
        print(json.dumps(child(kind, name, Path(folder), args.child_blocks or None, value, args.repeats)))
        return
    names = [n for n in args.families.split(",") if n]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown families: {', '.join(unknown)} (choose from {', '.join(FAMILIES)})")
    blocks = _blocks_for(args.blocks)
    named = {kv.split("=")[0] for kv in args.step_blocks.split(",") if kv}
    step_blocks = {k: v for k, v in _blocks_for(args.step_blocks or None).items() if k in named}
    import diffusers

    import accuquant as aq

    out = Path(args.out)
    path = out.with_suffix(".json")
    old = json.loads(path.read_text()).get("families", {}) if path.exists() else {}
    doc = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
           "diffusers": diffusers.__version__, "accuquant": aq.__version__, "python": platform.python_version(),
           "settings": settings(args), "wall_s": None, "families": {}}
    t0 = time.perf_counter()
    done = {}
    for name in names:
        done[name] = run_family(name, blocks[name], args, step_blocks.get(name, blocks[name]))
        doc["families"] = {n: done.get(n) or old[n] for n in FAMILIES if n in done or n in old}
        doc["wall_s"] = round(time.perf_counter() - t0, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # after each family: a long run keeps what it measured
            tmp.write_text(json.dumps(doc, indent=2))
        with atomic_path(out.with_suffix(".md")) as tmp:
            tmp.write_text(table(doc))
    print(table(doc))
    print(f"wall time {doc['wall_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
