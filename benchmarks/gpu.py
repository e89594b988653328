"""Deployment on a CUDA GPU: the speed of one denoiser call in bf16, on accuquant's
``cuda-int8`` backend, with torchao's int8 dynamic quantization, torchao's int4
weight-only quantization and FP8 (torchao's float8 dynamic quantization, which runs
``torch._scaled_mm`` on Hopper), and one AccuQuant optimisation step's time and peak CUDA
memory at M = 1, 4 and 8 (checkpoint gradient).

Models, random-initialised (speed and memory do not depend on the values):
* SD-1.5 size: the 860 M-parameter UNet configuration, 64 x 64 latents (512 px);
* FLUX size: FLUX.1-dev's published configuration with ``--flux-blocks`` double-stream
  and twice as many single-stream blocks (published: 19 and 38), 128 x 128 latents
  (1024 px, 4096 image tokens) and 512 text tokens.

Every call is batch ``--batch`` at a mid-trajectory timestep, timed with the GPU
synchronised, medians over ``--repeats`` after two warm-up calls; torchao's variants run
eagerly (no ``torch.compile``: its compile time would not fit the budget). A variant that
cannot run records why and the others go on; the results file is rewritten after each
measurement, so a run stopped by its time limit keeps what it measured.

    bash benchmarks/gpu.sh             # a CUDA machine, at most 8 minutes: results/gpu.{json,md}
    bash benchmarks/gpu.sh --dry-run   # the CPU: tiny models, every path that runs there; writes nothing
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from accuquant.io.files import atomic_path
from common import ROOT, sd15_unet

RESULTS = ROOT / "benchmarks" / "results"
STEPS = 20


def build(name: str, dry: bool, flux_blocks: int):
    """``(pipeline, conditions of one sample)`` of ``name`` (``sd15``, ``flux``), tiny with ``dry``."""
    import diffusers

    import accuquant as aq
    from accuquant.models import adapter_class

    torch.manual_seed(0)
    if name == "sd15":
        model = sd15_unet(64) if not dry else diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=8,
            norm_num_groups=8).eval()
        pipe = aq.Pipeline(model, dict(diffusers.DDIMScheduler().config), defaults=aq.SamplingDefaults(1.0))
        cond = {"embeds": (77, model.config.cross_attention_dim)}
    else:
        from families_full_size import FAMILIES, config_of

        cfg = config_of("flux", flux_blocks) if not dry else dict(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4))
        model = diffusers.FluxTransformer2DModel.from_config(cfg).eval()
        pipe = aq.Pipeline(model, dict(FAMILIES["flux"]["scheduler"]), denoiser_name=adapter_class(model).component,
                           defaults=aq.SamplingDefaults(1.0, sample_size=8 if dry else 128))
        cond = {"embeds": (16 if dry else 512, cfg["joint_attention_dim"]), "pooled": (cfg["pooled_projection_dim"],)}
    g = torch.Generator().manual_seed(0)
    return pipe, aq.Conditions({k: torch.randn(1, *s, generator=g) for k, s in cond.items()})


def timed(fn, device: torch.device, repeats: int) -> dict:
    """Median and spread of ``fn()`` in milliseconds, after two warm-up calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def _torchao(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """A bf16 copy of ``model`` with torchao's ``kind`` (``int8-dynamic``, ``int4-weight``,
    ``fp8-dynamic``) on its Linear layers."""
    from torchao.quantization import quantize_

    import torchao.quantization as tq

    config = {"int8-dynamic": lambda: tq.Int8DynamicActivationInt8WeightConfig(),
              # tinygemm's layout: its kernel ships with torch (the default layout needs the mslk package)
              "int4-weight": lambda: tq.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
              "fp8-dynamic": lambda: tq.Float8DynamicActivationFloat8WeightConfig()}[kind]()
    m = copy.deepcopy(model).to(torch.bfloat16)
    quantize_(m, config)
    return m


def speed(name: str, args, device: torch.device, record) -> None:
    """Each variant's denoiser call on ``name``, recorded in turn."""
    import accuquant as aq
    from accuquant.quant.layers import freeze_model

    pipe, cond = build(name, args.dry_run, args.flux_blocks)
    pipe.to(device)
    record(name, "params", sum(p.numel() for p in pipe.model.parameters()))
    x = torch.randn(args.batch, *pipe.denoiser(1.0).sample_shape, generator=torch.Generator().manual_seed(1))
    c32 = aq.Conditions({k: v.expand(args.batch, *v.shape[1:]) for k, v in cond.items()}).to(device)
    inputs = {torch.float32: (x.to(device), c32),
              torch.bfloat16: (x.to(device, torch.bfloat16),
                               aq.Conditions({k: v.to(torch.bfloat16) for k, v in c32.items()}))}
    t = pipe.solver(STEPS).timesteps[STEPS // 2]

    def call(model, dtype):
        den = dataclasses.replace(pipe, model=model).denoiser(1.0)
        xx, cc = inputs[dtype]
        return lambda: den(xx, t, cc)

    def accuquant_int8():  # min-max ranges from one 4-step trajectory: the values do not matter for speed
        calib = aq.collect_trajectories(pipe.denoiser(1.0), pipe.solver(4), 1, cond=cond.to(device), batch_size=1,
                                        device=device, progress=False)
        q = aq.quantize(dataclasses.replace(pipe, model=copy.deepcopy(pipe.model)),
                        aq.QuantConfig(weight_bits=8, act_bits=8, weight_init="minmax", act_init="minmax"), "naive",
                        calib=calib, steps=4, batch_size=1, device=str(device), progress=False, use_cache=False,
                        inplace=True)
        freeze_model(q.model, "cuda-int8")
        return call(q.model, torch.float32)

    variants = {"fp32": lambda: call(pipe.model, torch.float32),
                "bf16": lambda: call(copy.deepcopy(pipe.model).to(torch.bfloat16), torch.bfloat16),
                "accuquant W8A8 cuda-int8": accuquant_int8}
    for kind in ("int8-dynamic", "int4-weight", "fp8-dynamic"):
        variants[f"torchao {kind}"] = lambda kind=kind: call(_torchao(pipe.model, kind), torch.bfloat16)
    for label, make in variants.items():
        try:
            record(name, label, timed(make(), device, args.repeats))
        except Exception as e:  # noqa: BLE001 (a variant that cannot run here says why; the others go on)
            record(name, label, {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"})
            if args.dry_run and label in REQUIRED:
                traceback.print_exc()
                raise SystemExit(f"gpu.py --dry-run: {name} {label} failed")
        if device.type == "cuda":
            torch.cuda.empty_cache()


#: what the dry run must get through on the CPU (torchao's kernels need CUDA)
REQUIRED = ("fp32", "bf16", "accuquant W8A8 cuda-int8", "step")


def step(name: str, args, device: torch.device, record) -> None:
    """One AccuQuant optimisation step at each M on ``name``, W4A8 with min-max ranges and the
    start's weight codes fixed (AccuQuant's default)."""
    import accuquant as aq
    from accuquant.calibrate.loop import calibrate
    from accuquant.calibrate.protocol import Run
    from accuquant.methods.naive import Naive, NaiveConfig
    from common import accuquant_step

    pipe, cond = build(name, args.dry_run, args.flux_blocks)
    pipe.to(device)
    for p in pipe.model.parameters():
        p.requires_grad_(False)
    den, solver = pipe.denoiser(1.0), pipe.solver(STEPS)
    calib = aq.collect_trajectories(den, solver, 1, cond=cond.to(device), batch_size=1, device=device, progress=False)
    cfg = aq.QuantConfig(weight_bits=4, act_bits=8, weight_init="minmax", act_init="minmax")
    den.wrap(cfg)
    calibrate(Run(den, solver, calib, cfg, batch_size=1, device=device, progress=False),
              Naive(NaiveConfig(act_calib_pairs=4)))
    for m in args.ms:
        try:
            record(name, f"step M={m}", accuquant_step(pipe, den, solver, calib, m, True, str(device)))
        except Exception as e:  # noqa: BLE001
            record(name, f"step M={m}", {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"})
            if args.dry_run:
                traceback.print_exc()
                raise SystemExit(f"gpu.py --dry-run: {name} step M={m} failed")


def table(doc: dict) -> str:
    """The results as markdown: speed per variant, then the step's time and memory per M."""
    lines = [f"One denoiser call (batch {doc['batch']}, mid-trajectory) and one AccuQuant step on {doc['device']} "
             f"(torch {doc['torch']}, torchao {doc['torchao']}); random-initialised models: {doc['models_note']}. "
             "Medians of the calls after two warm-up calls; speed-up: bf16's median over the variant's. "
             "Written by benchmarks/gpu.py.", "",
             "| model | variant | median ms | speed-up vs bf16 |", "| --- | --- | --- | --- |"]
    for name, r in doc["models"].items():
        bf16 = r.get("bf16", {}).get("median_ms")
        for label, v in r.items():
            if label == "params" or label.startswith("step"):
                continue
            if "error" in v:
                lines.append(f"| {name} | {label} | not run: {v['error']} | |")
            else:
                ratio = f"{bf16 / v['median_ms']:.2f}x" if bf16 else "n/a"
                lines.append(f"| {name} | {label} | {v['median_ms']:.1f} | {ratio} |")
    lines += ["", "| model | M | step s | peak memory above the start (MB; CUDA allocated) | vs M = 1 |",
              "| --- | --- | --- | --- | --- |"]
    for name, r in doc["models"].items():
        first = r.get(f"step M={doc['ms'][0]}", {}).get("peak_mb")
        for m in doc["ms"]:
            v = r.get(f"step M={m}")
            if v is None or "error" in v:
                lines.append(f"| {name} | {m} | not run{': ' + v['error'] if v else ''} | | |")
                continue
            ratio = f"{v['peak_mb'] / first:.2f}x" if first else "n/a"
            lines.append(f"| {name} | {m} | {v['seconds']:.2f} | {v['peak_mb']:.0f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU; checks every path, writes nothing")
    p.add_argument("--models", default="sd15,flux")
    p.add_argument("--flux-blocks", type=int, default=2, help="FLUX double-stream blocks (single-stream: twice)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--ms", default="1,4,8")
    p.add_argument("--out", default=str(RESULTS / "gpu"))
    args = p.parse_args()
    args.ms = [int(m) for m in args.ms.split(",")]
    if args.dry_run:
        device, args.repeats = torch.device("cpu"), 2
    elif not torch.cuda.is_available():
        print("gpu.py: no CUDA GPU here (use --dry-run to check the script on the CPU)", file=sys.stderr)
        raise SystemExit(2)
    else:
        device = torch.device("cuda")
    try:
        import torchao
        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = "not installed"
    doc = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)",
           "torch": torch.__version__, "torchao": torchao_version, "batch": args.batch, "ms": args.ms,
           "models_note": f"SD-1.5-size UNet (64 x 64 latents); FLUX.1-dev configuration with {args.flux_blocks} "
                          f"double- and {2 * args.flux_blocks} single-stream blocks (published 19 and 38; 128 x 128 "
                          "latents, 512 text tokens)", "models": {}}

    def record(name, label, value):
        doc["models"].setdefault(name, {})[label] = value
        print(f"{name} {label}: {value}", flush=True)
        if not args.dry_run:  # after each measurement: a run stopped by its time limit keeps what it measured
            with atomic_path(Path(args.out + ".json")) as tmp:
                tmp.write_text(json.dumps(doc, indent=2))
            with atomic_path(Path(args.out + ".md")) as tmp:
                tmp.write_text(table(doc))

    for name in args.models.split(","):
        speed(name, args, device, record)
        step(name, args, device, record)
    print(table(doc))


if __name__ == "__main__":
    main()
