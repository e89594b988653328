"""Regenerate ``tests/data/legacy-w4a8`` and ``tests/data/legacy-w4a8-reference.safetensors``.

A tiny class-conditional UNet (attention and shortcut-split layers included), quantized
W4A8 with the naive method and saved in format ``accuquant.quantized/1``, with outputs
computed in the same process: the denoiser on fixed inputs and a 5-step DDIM trajectory
from stored noise. ``tests/test_legacy_model.py`` loads it with the current code and
requires bit-identical outputs.

It must be run with the release before the backend refactor (the code whose frozen layers
dequantize their codes on every forward), e.g. from a checkout of that commit::

    PYTHONPATH=<old checkout>/src python tests/data/make_legacy_model.py

The outputs depend on the CPU's vector instructions: ``legacy-w4a8-reference.safetensors``
was computed on an AVX2 CPU. ``--reference-only`` computes them for the saved model on
this CPU, with the same old release, into ``legacy-w4a8-reference-<capability>.safetensors``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import diffusers
import torch
from safetensors.torch import save_file

import accuquant as aq

HERE = Path(__file__).parent
MODEL = HERE / "legacy-w4a8"
REFERENCE = HERE / "legacy-w4a8-reference.safetensors"
#: float results depend on the thread count; the test runs with the same
THREADS = 1


def reference_only() -> None:
    from safetensors.torch import load_file

    torch.set_num_threads(THREADS)
    ref = load_file(str(REFERENCE))
    q = aq.load(str(MODEL))
    den, cond = q.denoiser(), aq.Conditions(labels=ref["labels"])
    with torch.no_grad():
        out = den(ref["x"], 500, cond)
        traj = aq.run_trajectory(den, aq.make_solver("ddim", q.scheduler_config, 5), ref["noise"], cond)
    cap = torch.backends.cpu.get_cpu_capability()
    path = HERE / f"legacy-w4a8-reference-{cap}.safetensors"
    save_file({**ref, "out": out, "trajectory": traj}, str(path),
              metadata={"timestep": "500", "solver": "ddim", "steps": "5", "accuquant": aq.__version__,
                        "threads": str(THREADS), "cpu_capability": cap})
    print(f"wrote {path}")


def main() -> None:
    if "--reference-only" in sys.argv:
        return reference_only()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=11,
    ).eval()
    pipe = aq.Pipeline(unet, dict(diffusers.DDIMScheduler().config), defaults=aq.SamplingDefaults(2.0, 10, 10))
    q = aq.quantize(pipe, aq.QuantConfig(weight_bits=4, act_bits=8), method="naive", steps=5, calib_samples=4,
                    progress=False, use_cache=False)
    assert q.quant["splits"] and q.quant["report"]["attention"], "the model must have split layers and attention"
    if MODEL.exists():
        shutil.rmtree(MODEL)
    q.save(MODEL)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 16, 16, generator=g)
    labels = torch.tensor([0, 3, 7, 9])
    noise = torch.randn(4, 1, 16, 16, generator=g)
    den = q.denoiser()
    with torch.no_grad():
        out = den(x, 500, aq.Conditions(labels=labels))
        # the old release's name for the solver factory (make_solver today)
        traj = aq.run_trajectory(den, aq.make_solver("ddim", q.scheduler_config, 5), noise, aq.Conditions(labels=labels))
    save_file({"x": x, "labels": labels, "out": out, "noise": noise, "trajectory": traj}, str(REFERENCE),
              metadata={"timestep": "500", "solver": "ddim", "steps": "5", "accuquant": aq.__version__,
                        "threads": str(THREADS)})
    print(f"wrote {MODEL} and {REFERENCE}")


if __name__ == "__main__":
    main()
