"""Peak memory of calibration on a Stable-Diffusion-1.5-size UNet, on the CPU.

The UNet has SD-1.5's published configuration (860 M parameters), random-initialised
(memory does not depend on the values), with random text embeddings (77 x 768),
guidance 7.5 (two rows per prompt) and 20 DDIM steps; latents are ``--latent`` pixels
square (default 8: even there one guided call of 4 prompts takes seconds on 2 cores, and
the published 64 x 64 would take hours per collection; activations scale with the
latent's area, weights and text embeddings do not).
Each measurement is a fresh process whose peak resident memory is reset
(``/proc/self/clear_refs``) just before the measured work; reported is that work's peak
minus the resident memory before it:

* trajectory collection of N prompts, 4 at a time (streamed to its file), for each N of
  ``--prompts``: flat in N when nothing grows with the number of trajectories;
* per-step's capture of the block with the most data per row (2 points per step, 80 rows) with each
  ``--max-memory`` budget of ``--budgets``: the block data held in RAM against the budget;
* one AccuQuant optimisation step (checkpoint gradient, one trajectory) at M = 1, 4, 8,
  W4A8 with min-max ranges: the target is M = 8 within 1.15x of M = 1.

    python benchmarks/memory_sd.py        # results/memory_sd.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from accuquant.config import parse_size
from accuquant.io.files import atomic_path
from common import (ROOT, accuquant_step, cpu_name, measure_env, reset_peak, rss_mb, save_minmax_quantizers,
                    sd15_conditions, sd15_unet, wrapped_from)

RESULTS = ROOT / "benchmarks" / "results"
CONFIG = dict(weight_bits=4, act_bits=8, weight_init="minmax", act_init="minmax")


def _pipe(latent: int):
    import diffusers

    import accuquant as aq

    return aq.Pipeline(sd15_unet(latent), dict(diffusers.DDIMScheduler().config), defaults=aq.SamplingDefaults(7.5))


def _wrapped(latent: int, folder: Path):
    """The W4A8 UNet with the quantizers of ``setup`` loaded."""
    pipe = _pipe(latent)
    return pipe, wrapped_from(pipe, CONFIG, folder / "quantizers.safetensors", "memory-sd")


def child(kind: str, value: str, latent: int, folder: Path) -> dict:
    import torch

    import accuquant as aq

    torch.set_grad_enabled(False)
    solver_of = lambda p: aq.make_solver("ddim", p.scheduler_config, 20)  # noqa: E731
    out: dict = {"kind": kind, "value": value}
    if kind == "collect":
        n = int(value)
        pipe = _pipe(latent)
        den, cond = pipe.denoiser(), sd15_conditions(n)
        before = reset_peak()
        t0 = time.perf_counter()
        aq.collect_trajectories(den, solver_of(pipe), n, cond=cond, batch_size=4, progress=False,
                                path=folder / f"calib{n}.safetensors")
        out.update(file_mb=(folder / f"calib{n}.safetensors").stat().st_size / 2**20)
    elif kind == "setup":  # min-max ranges on the smallest set, saved for the other processes
        pipe = _pipe(latent)
        save_minmax_quantizers(pipe, solver_of(pipe), aq.Trajectories.load(folder / "calib.safetensors"), CONFIG,
                               folder / "quantizers.safetensors", "memory-sd")
        return out
    elif kind == "capture":
        from accuquant.calibrate.block_data import capture, collect, parse_size
        from accuquant.calibrate.blocks import find_blocks

        pipe, den = _wrapped(latent, folder)
        calib = aq.Trajectories.load(folder / "calib.safetensors")
        first = next(calib.batches(calib.points(1, 0)[:2], 2))
        blocks = find_blocks(pipe.model, lambda: den(*first), den.block_types)
        def row_bytes(b):  # bytes per row of what per-step keeps of the block: batched inputs
            args, kwargs = capture(b.module, lambda: den(*first), "input")
            rows = first[0].shape[0] * 2  # guided: two branches
            return sum(t.numel() * t.element_size() for t in [*args, *kwargs.values()]
                       if torch.is_tensor(t) and t.dim() and t.shape[0] == rows) / rows

        block = max(blocks, key=row_bytes)
        points = calib.points(2, 0)
        before = reset_peak()
        t0 = time.perf_counter()
        data = collect(den, block.module, calib.batches(points, 4), 256, parse_size(value), folder / "spill")
        out.update(block=block.name, rows=data.rows, data_ram_peak_mb=data.peak_ram_bytes / 2**20,
                   budget_mb=parse_size(value) / 2**20, chunks_on_disk=data.on_disk, chunks=len(data.chunks))
        seconds, peak = time.perf_counter() - t0, rss_mb("VmHWM")
        data.close()
        return {**out, "seconds": seconds, "rss_before_mb": before, "peak_mb": peak - before}
    elif kind in ("step", "step-codes"):  # step-codes: AccuQuant's default, the start's integer codes fixed
        pipe, den = _wrapped(latent, folder)
        calib = aq.Trajectories.load(folder / "calib.safetensors")
        return {**out, **accuquant_step(pipe, den, solver_of(pipe), calib, int(value), kind == "step-codes")}
    out.update(seconds=time.perf_counter() - t0, rss_before_mb=before, peak_mb=rss_mb("VmHWM") - before)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, default=8, help="latent side in pixels (default 8)")
    p.add_argument("--prompts", default="4,16", help="collection sizes (the first is what the others calibrate on)")
    p.add_argument("--budgets", default="2GB,4MB", help="--max-memory budgets of the capture")
    p.add_argument("--ms", default="1,4,8")
    p.add_argument("--codes-ms", default="1", help="M of the step with fixed weight codes (AccuQuant's default)")
    p.add_argument("--config", default="{}", help="QuantConfig options as JSON, over W4A8 with min-max ranges "
                   "(e.g. outlier handling: its parameters learn in the step too)")
    p.add_argument("--out", default=str(RESULTS / "memory_sd"))
    p.add_argument("--child", nargs=3, metavar=("KIND", "VALUE", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    CONFIG.update(json.loads(args.config))
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.latent, Path(args.child[2]))))
        return
    env = measure_env()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [("collect", n) for n in args.prompts.split(",")] + [("setup", "-")]
        jobs += [("capture", b) for b in args.budgets.split(",") if b] + [("step", m) for m in args.ms.split(",") if m]
        jobs += [("step-codes", m) for m in args.codes_ms.split(",") if m]
        for kind, value in jobs:
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, __file__, "--child", kind, value, tmp, "--latent", str(args.latent),
                                  "--config", args.config],
                                 capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise SystemExit(f"memory_sd.py: {kind} {value} failed:\n{res.stderr[-2000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            if kind == "collect" and value == args.prompts.split(",")[0]:
                os.link(Path(tmp) / f"calib{value}.safetensors", Path(tmp) / "calib.safetensors")
            r["process_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(r), flush=True)
            if kind != "setup":
                rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()})
    path = Path(args.out).with_suffix(".json")
    if path.exists():  # measurements not repeated now are kept
        done = {(r["kind"], r["value"]) for r in rows}
        rows = [r for r in json.loads(path.read_text())["rows"] if (r["kind"], r["value"]) not in done] + rows
        rows.sort(key=lambda r: (["collect", "capture", "step", "step-codes"].index(r["kind"]), parse_size(r["value"])))
    steps = {r["value"]: r for r in rows if r["kind"] == "step"}
    for r in steps.values():
        r["vs_m1"] = round(r["peak_mb"] / steps["1"]["peak_mb"], 3) if "1" in steps else None
    doc = {"latent": args.latent, "guidance": 7.5, "steps": 20, "config": CONFIG, "cpu": cpu_name(), "rows": rows}
    with atomic_path(Path(args.out).with_suffix(".json")) as t:
        t.write_text(json.dumps(doc, indent=2))
    lines = [f"Written by benchmarks/memory_sd.py: SD-1.5-configuration UNet (860 M parameters, random weights), "
             f"{args.latent}x{args.latent} latents, guidance 7.5, 20 DDIM steps, on the CPU ({cpu_name()}); "
             f"quantization options {json.dumps(CONFIG)}. Peak resident memory "
             "of the work minus the resident memory before it, one fresh process each (the model itself, about "
             "3.3 GB in float32, is in the memory before).", "",
             "| work | setting | peak above before (MB) | other | seconds |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["kind"] == "collect":
            other = f"trajectory file {r['file_mb']:.0f} MB"
            what, setting = "trajectory collection (streamed to its file)", f"{r['value']} prompts"
        elif r["kind"] == "capture":
            other = (f"block data in RAM at most {r['data_ram_peak_mb']:.0f} MB (budget {r['budget_mb']:.0f} MB); "
                     f"{r['rows']} rows, {r['chunks_on_disk']}/{r['chunks']} chunks on disk")
            what, setting = f"per-step capture of {r['block']}", f"--max-memory {r['value']}"
        elif r["kind"] == "step":
            other = f"{r['vs_m1']}x M = 1" if r.get("vs_m1") else ""
            what, setting = "one AccuQuant step (checkpoint gradient, 1 trajectory, 2 rows)", f"M = {r['value']}"
        else:
            other = "weight codes fixed (AccuQuant's default start: rounding=keep)"
            what, setting = "one AccuQuant step, fixed codes (checkpoint gradient, 1 trajectory, 2 rows)", \
                f"M = {r['value']}"
        lines.append(f"| {what} | {setting} | {r['peak_mb']:.0f} | {other} | {r['seconds']:.0f} |")
    with atomic_path(Path(args.out).with_suffix(".md")) as t:
        t.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
