"""Helpers the benchmark scripts share."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    """The CPU's model name (every results file names the machine its numbers come from)."""
    import platform

    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def settings(args) -> dict:
    """The command's options, with the output path relative to the repository."""
    return {**vars(args), "out": os.path.relpath(args.out, ROOT)}


def parse_options(text: str) -> dict:
    """``"key=value,key=value"`` as method options: booleans (``true``, ``false``), integers,
    floats (``3e-4``) or strings."""
    opts = {}
    for kv in filter(None, text.split(",")):
        k, v = kv.split("=")
        if v in ("true", "false"):
            opts[k] = v == "true"
            continue
        try:
            opts[k] = int(v)
        except ValueError:
            try:
                opts[k] = float(v)
            except ValueError:
                opts[k] = v
    return opts


def sd15_unet(sample_size: int = 64):
    """A UNet with Stable Diffusion 1.5's published configuration (860 M parameters),
    random-initialised with seed 0 (speed and memory only: the values mean nothing)."""
    import diffusers
    import torch

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()


def sd15_conditions(n: int):
    """``n`` random text embeddings of SD-1.5's shape (77 tokens of width 768), zero negatives."""
    import torch

    import accuquant as aq

    g = torch.Generator().manual_seed(n)
    return aq.Conditions(embeds=torch.randn(n, 77, 768, generator=g), negative_embeds=torch.zeros(n, 77, 768))


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its peak since the last reset (``VmHWM``), in MB."""
    import re

    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024


def reset_peak() -> float:
    """Reset the process's peak resident memory; the resident memory now."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return rss_mb()


#: glibc settings of a measured child process (each may be overridden from the environment)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4096", "MALLOC_TRIM_THRESHOLD_": "0"}


def measure_env() -> dict:
    """The environment of a measured child process. glibc raises its mmap threshold each time a
    large block is freed and keeps small blocks in its heap, so the graph of a finished step stays
    there and the next one is added beside it, fragmented: peak RSS would count the allocator's
    retention (up to a third of a small model's step). A low fixed mmap threshold and no trim
    threshold return freed tensors to the system, so a peak is what the work holds."""
    return {**os.environ, **{k: os.environ.get(k, v) for k, v in MALLOC_ENV.items()}}


def malloc_settings(env: dict) -> str:
    """The glibc settings of ``env`` as a results file quotes them."""
    return " ".join(f"{k}={env[k]}" for k in MALLOC_ENV)


def save_minmax_quantizers(pipe, solver, calib, config: dict, path: Path, key: str, batch_size: int = 4) -> None:
    """Wrap ``pipe``'s denoiser with ``QuantConfig(**config)``, set its ranges by the naive method
    on 8 points of ``calib`` and save its quantizers to ``path`` (checkpoint ``key``), for
    :func:`wrapped_from` in other processes."""
    import accuquant as aq
    from accuquant.calibrate.loop import calibrate
    from accuquant.calibrate.protocol import Run
    from accuquant.io.checkpoint import save_checkpoint
    from accuquant.methods.naive import Naive, NaiveConfig

    den = pipe.denoiser()
    cfg = aq.QuantConfig(**config)
    den.wrap(cfg)
    calibrate(Run(den, solver, calib, cfg, batch_size=batch_size, progress=False),
              Naive(NaiveConfig(act_calib_pairs=8)))
    save_checkpoint(path, pipe.model, key, 0)


def wrapped_from(pipe, config: dict, path: Path, key: str):
    """``pipe``'s denoiser wrapped with ``QuantConfig(**config)`` and the quantizers saved by
    :func:`save_minmax_quantizers` loaded; the model's own parameters take no gradients (as in
    calibration, only quantizer parameters do)."""
    import accuquant as aq
    from accuquant.io.checkpoint import load_quantizers, read_checkpoint

    den = pipe.denoiser()
    for p in pipe.model.parameters():
        p.requires_grad_(False)
    den.wrap(aq.QuantConfig(**config))
    load_quantizers(pipe.model, read_checkpoint(path, key)[1])
    return den


def accuquant_step(pipe, den, solver, calib, m: int, fixed_codes: bool = False, device: str = "cpu") -> dict:
    """One AccuQuant optimisation step (checkpoint gradient) from the first trajectory of
    ``calib`` over ``m`` steps, step sizes learned (``fixed_codes``: the start's integer weight
    codes fixed, AccuQuant's default): its ``seconds``, the memory before it and its peak
    above that (MB): resident memory on the CPU, allocated CUDA memory on a GPU (the model
    on ``device``)."""
    import time

    import torch

    from accuquant.calibrate.multistep import multistep_backward
    from accuquant.quant.layers import all_quantizers, outlier_parameters, quant_layers

    if fixed_codes:
        for layer in quant_layers(pipe.model).values():
            for q, part in layer.weight_parts():
                q.fix_codes(part.detach())
    for q in all_quantizers(pipe.model).values():
        if q.enabled:
            q.scale.requires_grad_(True)
    for t in outlier_parameters(quant_layers(pipe.model)).values():  # smoothing scales, branch factors learn too
        t.requires_grad_(True)
    idx = torch.tensor([0])
    xs, outs = calib.xs[idx].to(device), calib.outs[idx].to(device)
    state = solver.state_at(0, xs, outs)
    cond = calib.cond.index(idx).to(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = reset_peak()
    t0 = time.perf_counter()
    with torch.enable_grad():
        multistep_backward(den, solver, xs[:, 0], state, 0, m, cond, xs[:, m], "checkpoint")
    if cuda:
        torch.cuda.synchronize()
        return {"seconds": time.perf_counter() - t0, "cuda_before_mb": before,
                "peak_mb": torch.cuda.max_memory_allocated() / 2**20 - before}
    return {"seconds": time.perf_counter() - t0, "rss_before_mb": before, "peak_mb": rss_mb("VmHWM") - before}
