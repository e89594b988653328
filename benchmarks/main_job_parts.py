"""Where the main job's fixed costs go: the bundled model's forward pass and the quality
summary's parts, timed one by one in one process (with the threads it is given).

* the FP UNet's forward pass per row at the summary's pass size (32 samples, both guidance
  branches: 64 rows), the share of its time in convolutions (torch.profiler), and the same
  pass in channels-last memory format;
* the summary's parts: the calibration trajectories and the naive method's ranges, 300
  FP samples, 300 samples of the naive (fake-quantized) model, and an evaluation of it on
  300 pairs (the FP samples cached: its own samples and the scoring).

    python benchmarks/main_job_parts.py          # results/main_job_parts.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from accuquant.io.files import atomic_path
from common import ROOT

RESULTS = ROOT / "benchmarks" / "results"


def forward_profile(repeats: int = 10) -> dict:
    import torch
    from torch.profiler import profile

    from accuquant.io.load import load_pipeline

    model = load_pipeline("mnist-ddpm").denoiser().model.eval()
    x, t, y = torch.randn(64, 1, 28, 28), torch.full((64,), 500), torch.randint(0, 10, (64,))
    def ms_per_row(m, inp) -> float:
        for _ in range(3):
            m(inp, t, class_labels=y)
        t0 = time.perf_counter()
        for _ in range(repeats):
            m(inp, t, class_labels=y)
        return (time.perf_counter() - t0) / repeats / 64 * 1e3

    with torch.no_grad():
        ms_row = ms_per_row(model, x)
        with profile() as prof:
            for _ in range(3):
                model(x, t, class_labels=y)
        # the same pass in channels-last memory format (oneDNN's preferred layout), then back
        ms_cl = ms_per_row(model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last))
        ms_again = ms_per_row(model.to(memory_format=torch.contiguous_format), x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
    return {"ms_per_row": round(ms_row, 3), "conv_share": round(conv / total, 3),
            "channels_last_ms_per_row": round(ms_cl, 3), "ms_per_row_after": round(ms_again, 3)}


def summary_parts(num: int) -> dict:
    import accuquant as aq
    from accuquant.eval.evaluation import evaluate, fp_samples
    from accuquant.io.load import load_pipeline

    cfg, parts = aq.QuantConfig(weight_bits=4, act_bits=8), {}
    fp = load_pipeline("mnist-ddpm")
    t0 = time.perf_counter()
    naive = aq.quantize(load_pipeline("mnist-ddpm"), cfg, "naive", progress=False)
    parts["calibration trajectories and naive ranges"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fp_samples(fp, num, 0, 20, None, batch_size=32, progress=False)
    parts[f"{num} FP samples"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive.sample(num, seed=0, steps=20, batch_size=32, progress=False)
    parts[f"{num} fake-quantized samples"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate(naive, fp, num=num, seed=0, batch_size=32, progress=False)
    parts[f"evaluate on {num} pairs, FP samples cached (its fake-quantized samples and scoring)"] = \
        time.perf_counter() - t0
    return {k: round(v, 1) for k, v in parts.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=300)
    p.add_argument("--out", default=str(RESULTS / "main_job_parts"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ACCUQUANT_CACHE"] = str(Path(tmp) / "cache")
        import torch

        doc = {"threads": torch.get_num_threads(), "forward": forward_profile(), "summary_s": summary_parts(args.num)}
    with atomic_path(Path(args.out).with_suffix(".json")) as f:
        f.write_text(json.dumps(doc, indent=2))
    fw = doc["forward"]
    lines = [f"Written by benchmarks/main_job_parts.py ({doc['threads']} threads, one process): the bundled UNet's "
             f"FP forward pass takes {fw['ms_per_row']:.2f} ms per row at 64 rows, {fw['conv_share']:.0%} of it in "
             f"convolutions (in channels-last memory format {fw['channels_last_ms_per_row']:.2f} ms, then "
             f"{fw['ms_per_row_after']:.2f} ms again in the default format); the quality summary's parts in seconds:",
             "",
             "| part | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in doc["summary_s"].items()]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
