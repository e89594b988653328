"""Peak memory of one AccuQuant optimisation step against the group size M, per gradient mode.

Each (mode, M) runs in a fresh process: a bundled model (``--model``, default mnist-ddpm) at
W4A8 (or ``--config``: QuantConfig options as JSON) with naive ranges (and outlier handling's
closed-form start, whose parameters then learn too) and a fixed batch of FP trajectories (both computed once and loaded from files), one call of ``multistep_backward`` from step 0 over M
steps. Reported: the process's peak resident memory (``ru_maxrss``), the resident memory
just before the step, and their difference (what the step itself needed); on CUDA also
torch's peak allocated memory during the step.

    python benchmarks/memory.py --ms 1,2,4,8,20 --modes exact,checkpoint,approx --batch 8 --repeats 3
    # writes benchmarks/results/memory.json and memory.md
    python benchmarks/memory.py --model mnist-flux --modes checkpoint --ms 1,4,8 --out benchmarks/results/memory_x \
        --config '{"weight_bits": 4, "act_bits": 4, "outliers": ["smooth", "lowrank"], "rank": 32}'

The medians over ``--repeats`` fresh processes are reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, cpu_name, malloc_settings, measure_env, settings


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _config(text: str):
    import accuquant as aq

    opts = json.loads(text)
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}
    return aq.QuantConfig(**{"weight_bits": 4, "act_bits": 8, **opts})


def _wrapped(model: str, config: str):
    import accuquant as aq

    pipe = aq.load(model)
    solver = pipe.solver(20)
    pipe.denoiser().wrap(pipe.denoiser().resolve(_config(config)))
    return pipe, solver


def setup(model: str, config: str, batch: int, folder: Path) -> None:
    """Once: FP trajectories and naive W4A8 quantizers, saved for the measuring processes."""
    from accuquant.calibrate.block_data import quantization_disabled
    from accuquant.io.checkpoint import save_checkpoint
    from accuquant.calibrate.loop import calibrate
    from accuquant.calibrate.protocol import Run
    from accuquant.methods.naive import Naive, NaiveConfig

    import accuquant as aq

    pipe, solver = _wrapped(model, config)
    den = pipe.denoiser()
    with quantization_disabled(pipe.model):  # FP trajectories
        calib = aq.collect_trajectories(den, solver, batch, cond=pipe.conditions(batch), progress=False)
    calibrate(Run(den, solver, calib, den.resolve(_config(config)), progress=False), Naive(NaiveConfig()))
    calib.save(folder / "calib.safetensors")
    save_checkpoint(folder / "quantizers.safetensors", pipe.model, "memory", 0)


def child(model: str, config: str, mode: str, m: int, batch: int, device: str, folder: Path) -> dict:
    import torch

    import accuquant as aq
    from accuquant.io.checkpoint import load_quantizers, read_checkpoint
    from accuquant.quant.layers import all_quantizers, outlier_parameters, quant_layers
    from accuquant.calibrate.multistep import multistep_backward

    pipe, solver = _wrapped(model, config)
    load_quantizers(pipe.model, read_checkpoint(folder / "quantizers.safetensors", "memory")[1])
    calib = aq.Trajectories.load(folder / "calib.safetensors")
    den = pipe.denoiser()
    pipe.to(device)
    for p in pipe.model.parameters():
        p.requires_grad_(False)
    for q in all_quantizers(pipe.model).values():
        q.scale.requires_grad_(True)
    for t in outlier_parameters(quant_layers(pipe.model)).values():  # smoothing scales, branch factors
        t.requires_grad_(True)
    x = calib.xs[:, 0].to(device)
    target = calib.xs[:, m].to(device)
    cond = calib.cond.to(device)
    state = solver.state_at(0, calib.xs.to(device), calib.outs.to(device))
    before = _rss_mb()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.enable_grad():
        multistep_backward(den, solver, x, state, 0, m, cond, target, mode)
    out = {"mode": mode, "m": m, "batch": batch, "seconds": time.perf_counter() - t0, "rss_before_mb": before,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    out["step_mb"] = out["peak_rss_mb"] - before
    if device == "cuda":
        torch.cuda.synchronize()
        out["cuda_step_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mnist-ddpm", help="a bundled model")
    p.add_argument("--config", default="{}", help="QuantConfig options as JSON (default: W4A8)")
    p.add_argument("--ms", default="1,2,4,8,20")
    p.add_argument("--modes", default="exact,checkpoint,approx")
    p.add_argument("--batch", type=int, default=8, help="trajectories per step (x2 rows with guidance)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/memory"))
    p.add_argument("--child", nargs=3, metavar=("MODE", "M", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.config, args.child[0], int(args.child[1]), args.batch, args.device,
                               Path(args.child[2]))))
        return
    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name)
    setup(args.model, args.config, args.batch, folder)
    env = measure_env()
    rows = []
    for mode in args.modes.split(","):
        for m in (int(v) for v in args.ms.split(",")):
            reps = []
            for _ in range(args.repeats):
                cmd = [sys.executable, __file__, "--child", mode, str(m), str(folder), "--batch", str(args.batch),
                       "--device", args.device, "--model", args.model, "--config", args.config]
                res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if res.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr}")
                reps.append(json.loads(res.stdout.strip().splitlines()[-1]))
            keys = [k for k in reps[0] if k.endswith("_mb") or k == "seconds"]
            rows.append({"mode": mode, "m": m, "batch": args.batch,
                         **{k: round(statistics.median(r[k] for r in reps), 1 if k != "seconds" else 2) for k in keys}})
            print(json.dumps(rows[-1]), flush=True)
    base = {r["mode"]: r["step_mb"] for r in rows if r["m"] == 1}
    for r in rows:
        r["step_vs_m1"] = round(r["step_mb"] / base[r["mode"]], 2) if base.get(r["mode"]) else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"rows": rows, "settings": settings(args), "cpu": cpu_name(),
                                                   "malloc": malloc_settings(env)}, indent=2))
    ms = sorted({r["m"] for r in rows})
    lines = ["| mode | " + " | ".join(f"M={m}" for m in ms) + " |", "|" + " --- |" * (len(ms) + 1)]
    for mode in args.modes.split(","):
        cells = {r["m"]: r for r in rows if r["mode"] == mode}
        lines.append(f"| {mode} | " + " | ".join(
            f"{cells[m]['step_mb']:.0f} MB ({cells[m]['step_vs_m1']}x), {cells[m]['seconds']:.1f} s" for m in ms) + " |")
    Path(args.out + ".md").write_text(
        f"Memory of one AccuQuant optimisation step on {args.model} ({_config(args.config).to_json()}; "
        f"{args.batch} trajectories, guided: {2 * args.batch} rows; {args.device}; CPU: {cpu_name()}): peak resident memory during the step minus the resident "
        f"memory before it, its ratio to M = 1, and the step's wall time; medians of {args.repeats} fresh "
        f"processes, run with {malloc_settings(env)} (glibc returns freed tensors "
        "to the system instead of keeping them in its heap). Written by benchmarks/memory.py.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
