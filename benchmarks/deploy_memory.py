"""Memory of a deployed SD-1.5-size UNet: float32, bf16 and quantized models on each backend.

The UNet has SD-1.5's published configuration (860 M parameters), random-initialised with
seed 0 (memory does not depend on the values). It is saved once in float32 (diffusers'
``save_pretrained``) and quantized once per bit width with the naive method (min-max
ranges, one calibration trajectory: quality is not measured here) and saved. Each
variant is then measured in a fresh process, as a user meets it:

* **load**: peak resident memory while loading the model from its files (diffusers'
  ``from_pretrained`` for float32 and bf16, ``accuquant.load`` with the backend for the
  quantized ones) above the process's resident memory before (torch, diffusers and
  accuquant imported); diffusers maps the safetensors file and reads its pages when first
  used, so its load takes little resident memory and the weights count at sampling;
* **peak**: peak resident memory over loading and a guided sampling run (``--steps`` DDIM
  steps, ``--latent`` x ``--latent`` latents, random 77 x 768 text embeddings), above the
  same before;
* **weights**: bytes of the tensors the denoiser holds (``accuquant.backends.placement.resident_bytes``),
  as a ratio of float32's.

    python benchmarks/deploy_memory.py          # results/deploy_memory.{json,md}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, cpu_name, measure_env, reset_peak, rss_mb, sd15_conditions, sd15_unet

from accuquant.eval.speed import bf16_hardware
from accuquant.io.files import atomic_path

RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("fp32", "bf16", "w8a8:fake", "w8a8:int8", "w4a8:fake", "w4a8:packed", "w4a8:int8")


def setup(folder: Path, latent: int, bits: list[str]) -> None:
    """The float32 UNet's files and each bit width's quantized model in ``folder``."""
    import diffusers

    import accuquant as aq

    unet = sd15_unet(latent)
    if not (folder / "fp32").is_dir():
        unet.save_pretrained(str(folder / "fp32"))
    ddim = dict(diffusers.DDIMScheduler().config)
    fp = aq.Pipeline(unet, ddim, defaults=aq.SamplingDefaults(7.5))
    calib = aq.collect_trajectories(fp.denoiser(), aq.make_solver("ddim", ddim, 2), 1, cond=sd15_conditions(1),
                                    batch_size=1, progress=False)
    for b in bits:
        if (folder / b).is_dir():
            continue
        w, a = (int(v) for v in b[1:].split("a"))
        cfg = aq.QuantConfig(weight_bits=w, act_bits=a, weight_symmetric=w == 8, weight_init="minmax",
                             act_init="minmax")
        q = aq.quantize(aq.Pipeline(sd15_unet(latent), ddim, defaults=aq.SamplingDefaults(7.5)), cfg, "naive",
                        calib=calib, steps=2, calib_samples=1, batch_size=1, progress=False)
        q.save(folder / b)
        del q


def child(variant: str, folder: Path, latent: int, steps: int) -> dict:
    import diffusers
    import torch

    import accuquant as aq
    from accuquant.backends.placement import placement, resident_bytes
    from accuquant.sampling import run_trajectory

    torch.set_num_threads(2)
    before = reset_peak()
    t0 = time.perf_counter()
    bits, _, backend = variant.partition(":")
    if backend:
        pipe = aq.load(folder / bits, backend=backend)
    else:
        dtype = torch.bfloat16 if variant == "bf16" else torch.float32
        unet = diffusers.UNet2DConditionModel.from_pretrained(str(folder / "fp32"), torch_dtype=dtype).eval()
        pipe = aq.Pipeline(unet, dict(diffusers.DDIMScheduler().config), defaults=aq.SamplingDefaults(7.5))
    load_s = time.perf_counter() - t0
    load_peak = rss_mb("VmHWM") - before
    held = rss_mb() - before
    weights = resident_bytes(pipe.model)
    if variant == "bf16" and not bf16_hardware():
        # without AVX512-BF16 or AMX, oneDNN's bf16 convolutions take ~100x float32's here:
        # the sampling run is skipped and the peak is the load's
        return {"variant": variant, "load_peak_mb": load_peak, "held_mb": held, "load_s": load_s,
                "peak_mb": load_peak, "sample_s": None, "weights_mb": weights / 2**20, "placement": {},
                "note": "sampling not run (no bf16 hardware)"}
    t0 = time.perf_counter()
    cond = sd15_conditions(1)
    den = pipe.denoiser()
    x = torch.randn(1, *den.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        run_trajectory(den, aq.make_solver("ddim", pipe.scheduler_config, steps), x, cond)
    sample_s = time.perf_counter() - t0
    where = {k: len(v) for k, v in placement(pipe.model).items()} if backend else {}
    return {"variant": variant, "load_peak_mb": load_peak, "held_mb": held, "load_s": load_s,
            "peak_mb": rss_mb("VmHWM") - before, "sample_s": sample_s, "weights_mb": weights / 2**20,
            "placement": where}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--latent", type=int, default=32, help="latent side of the sampling run (default 32)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "deploy_memory"))
    p.add_argument("--folder", default=None, help="keep the saved models here (made once, reused by later runs)")
    p.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.render_only:
        render(json.loads(Path(args.out).with_suffix(".json").read_text()), Path(args.out))
        return
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.latent, args.steps)))
        return
    variants = args.variants.split(",")
    bits = sorted({v.split(":")[0] for v in variants if ":" in v})
    env = measure_env()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.folder:
            tmp = args.folder
        if not all((Path(tmp) / b).is_dir() for b in ["fp32", *bits]):
            setup(Path(tmp), args.latent, bits)
        for v in variants:
            res = subprocess.run([sys.executable, __file__, "--child", v, tmp, "--latent", str(args.latent),
                                  "--steps", str(args.steps)], capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise SystemExit(f"deploy_memory.py: {v} failed:\n{res.stderr[-2000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(json.dumps(r), flush=True)
            rows.append({k: round(x, 2) if isinstance(x, float) else x for k, x in r.items()})
    ref = next((r for r in rows if r["variant"] == "fp32"), None)
    for r in rows:
        for k in ("weights_mb", "peak_mb"):
            r[k.replace("_mb", "_vs_fp32")] = round(r[k] / ref[k], 3) if ref else None
    doc = {"cpu": cpu_name(), "latent": args.latent, "steps": args.steps, "rows": rows}
    with atomic_path(Path(args.out).with_suffix(".json")) as t:
        t.write_text(json.dumps(doc, indent=2))
    render(doc, Path(args.out))


def render(doc: dict, out: Path) -> None:
    lines = [f"Written by benchmarks/deploy_memory.py on the CPU ({doc['cpu']}): an SD-1.5-configuration UNet "
             f"(860 M parameters, random weights), each variant loaded from its files in a fresh process; a guided "
             f"sampling run of {doc['steps']} DDIM steps at {doc['latent']}x{doc['latent']} latents. Memory is "
             "resident memory above the process's before the work (MB), as a ratio of float32's where it compares "
             "(diffusers maps the float32 file and reads it at first use, so its load alone takes little); weights: "
             "bytes of the tensors the denoiser holds. W8A8 weights are symmetric; on CPUs without VNNI the int8 "
             "kernels refuse 8-bit weight codes (they saturate there) and those layers run on fake.", "",
             "| variant | weights (MB) | x fp32 | peak while loading (MB) | peak over loading and sampling (MB) | "
             "x fp32 | layers by backend |", "| --- " * 7 + "|"]
    for r in doc["rows"]:
        lines.append(f"| {r['variant']} | {r['weights_mb']:.0f} | {r['weights_vs_fp32']:.3f} | "
                     f"{r['load_peak_mb']:.0f} | {r['peak_mb']:.0f} | {r['peak_vs_fp32']:.3f} | "
                     + (", ".join(f"{n} {k}" for k, n in r["placement"].items()) or r.get("note", "-")) + " |")
    with atomic_path(out.with_suffix(".md")) as t:
        t.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
