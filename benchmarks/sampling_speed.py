"""Sampling speed of a loaded quantized model against its FP base, in one process.

The bundled model (class-conditional UNet, 28x28, guidance 2) in FP32, and the same model
quantized W4A8 with the naive method, saved, and loaded back on ``--backend``. Each repeat
samples ``--num`` images with ``--steps`` DDIM steps from every model, in alternating
order, so that load from other processes falls on all of them alike. With ``--legacy``
the quantized model is also timed with the computation it had before the backends (every
layer dequantizing its weight codes at each forward).

    python benchmarks/sampling_speed.py --num 100 --steps 20 --repeats 5 --threads 1
    # writes benchmarks/results/sampling_speed.json

Reported: seconds per repeat, their median, min and max per model, and the ratio FP time
/ quantized time (above 1: the quantized model is faster), of the medians and per repeat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, settings


def _timed(pipe, args) -> float:
    t = time.perf_counter()
    pipe.sample(args.num, steps=args.steps, progress=False)
    return time.perf_counter() - t


def _stats(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3), "runs_s": [round(t, 3) for t in times]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--backend", default="fake")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--legacy", action="store_true", help="also time the per-forward dequantization of old")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sampling_speed.json")
    args = ap.parse_args()

    import accuquant as aq
    from accuquant import bundled
    from accuquant.quant.layers import quant_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    fp = aq.load_pipeline(bundled.DEFAULT_MODEL)
    q = aq.quantize(aq.load_pipeline(bundled.DEFAULT_MODEL), aq.QuantConfig(weight_bits=4, act_bits=8), method="naive",
                    steps=args.steps, calib_samples=args.calib_samples, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        q.save(Path(tmp) / "w4a8")
        loaded = aq.load_pipeline(Path(tmp) / "w4a8", backend=args.backend)
    models = {"fp32": fp, "w4a8": loaded}
    if args.legacy:
        old = loaded.copy()
        for layer in quant_layers(old.model).values():
            layer.kernel = None  # the frozen forward as it was: dequantize the codes at every call
        models["w4a8_legacy"] = old
    a = fp.sample(4, steps=2, progress=False)  # warm-up, and a check that the loaded model is the quantized one
    assert torch.equal(q.sample(4, steps=2, progress=False), loaded.sample(4, steps=2, progress=False))
    assert a.shape == (4, 1, 28, 28)
    times = {k: [] for k in models}
    for r in range(args.repeats):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for k in order:
            times[k].append(_timed(models[k], args))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in models), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "settings": settings(args),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "models": {k: _stats(v) for k, v in times.items()},
        "ratio_fp_over_quantized": {
            k: {"of_medians": round(med["fp32"] / med[k], 3),
                "per_repeat": [round(f / t, 3) for f, t in zip(times["fp32"], times[k])]}
            for k in models if k != "fp32"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratio_fp_over_quantized"]), file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
