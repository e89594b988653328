"""The torchao export of the bundled mnist-dit: how far its images are from the quantized
model's (fake backend) and from FP, all three run by diffusers' own ``DiTPipeline``.

It quantizes mnist-dit (naive, W4A8 and W8A8; cheap, and the export carries whatever
codes a method chose), exports each with ``accuquant.save_torchao`` twice (static int8
activations, the default, and weights only), loads each export with plain
``DiTPipeline.from_pretrained``, and samples ``--num`` images (balanced labels, ``--steps``
DDIM steps, one seeded generator per batch, the same for every model). PSNR is over the
decoded images in [0, 1], per image, then averaged; sizes are the files on disk; a
transformer call (one guided batch of 50) is timed against FP's in the same run (median
of 5; torchao's CPU int8 matmul is its reference path, not a fused kernel).

    python benchmarks/torchao_export.py --num 100    # writes benchmarks/results/torchao_export.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import accuquant as aq
from accuquant.eval.metrics import psnr
from common import ROOT, cpu_name


def call_seconds(transformer, repeats: int = 5) -> float:
    import statistics
    import time

    g = torch.Generator().manual_seed(0)
    c = transformer.config
    x = torch.randn(100, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t, labels = torch.full((100,), 500), torch.arange(100) % 10
    times = []
    with torch.inference_mode():
        transformer(x, t, labels)
        for _ in range(repeats):
            t0 = time.perf_counter()
            transformer(x, t, labels)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def images(pipe, num: int, steps: int, guidance: float, batch: int = 50) -> torch.Tensor:
    """``num`` images, ``batch`` at a time; each image's noise depends on its index only."""
    out = []
    for start in range(0, num, batch):
        labels = [k % 10 for k in range(start, min(num, start + batch))]
        gens = [torch.Generator().manual_seed(k) for k in range(start, start + len(labels))]
        out.append(pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                        generator=gens).images)
    return torch.cat(out).float().clamp(0, 1)


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main() -> None:
    import diffusers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--bits", default="w4a8,w8a8,w8a8-attnfp",
                   help="models to quantize; '-attnfp': attention matmuls left in float (what the export can carry)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "torchao_export.json"))
    args = p.parse_args()
    fp = aq.load("mnist-dit")
    guidance = fp.defaults.guidance_scale
    ref = images(fp.to_diffusers(), args.num, args.steps, guidance)
    rows = []
    fp_call = call_seconds(fp.model)
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits.split(","):
            w, a = (int(v) for v in bits.removesuffix("-attnfp")[1:].split("a"))
            attn = dict(attn_bits=None, softmax_bits=None) if bits.endswith("-attnfp") else {}
            q = aq.quantize("mnist-dit", aq.QuantConfig(weight_bits=w, act_bits=a, weight_symmetric=w == 8, **attn),
                            "naive", steps=args.steps, progress=False)
            q.save(Path(tmp) / bits)
            fake_pipe = aq.load(Path(tmp) / bits).to_diffusers()
            fake = images(fake_pipe, args.num, args.steps, guidance)
            # the quantized model against itself in other batches: float sums in another order move
            # a few activations across a rounding boundary, which sampling then carries on
            floor = psnr(images(fake_pipe, args.num, args.steps, guidance, batch=1), fake).clamp(max=99).mean().item()
            for act in ("static", "float"):
                where = Path(tmp) / f"{bits}-torchao-{act}"
                aq.save_torchao(q, where, activations=act)
                exported = diffusers.DiTPipeline.from_pretrained(str(where), torch_dtype=torch.float32)
                ex = images(exported, args.num, args.steps, guidance)
                rows.append({"bits": bits, "activations": act, "weight_symmetric": w == 8,
                             "psnr_export_vs_fake": psnr(ex, fake).clamp(max=99).mean().item(),
                             "psnr_fake_vs_itself_batch1": floor,
                             "psnr_fake_vs_fp": psnr(fake, ref).clamp(max=99).mean().item(),
                             "psnr_export_vs_fp": psnr(ex, ref).clamp(max=99).mean().item(),
                             "call_vs_fp": round(call_seconds(exported.transformer) / fp_call, 3),
                             "accuquant_dir_mb": round(size_mb(Path(tmp) / bits / "transformer"), 3),
                             "torchao_dir_mb": round(size_mb(where / "transformer"), 3)})
                print(rows[-1], flush=True)
    res = {"model": "mnist-dit", "method": "naive", "cpu": cpu_name(), "threads": torch.get_num_threads(),
           "fp_call_s": round(fp_call, 4), "num": args.num, "steps": args.steps, "guidance": guidance,
           "fp_transformer_mb": round(size_mb(Path(fp.source) / "transformer"), 3) if fp.source else None,
           "rows": rows}
    Path(args.out).write_text(json.dumps(res, indent=2))
    lines = [f"Written by benchmarks/torchao_export.py: mnist-dit quantized with the naive method, exported with "
             f"`accuquant.save_torchao`, loaded with plain `DiTPipeline.from_pretrained`; {args.num} images "
             f"({args.steps} DDIM steps, guidance {guidance}) from the same noise per image (its own seeded "
             f"generator) for FP, the quantized model "
             f"(`fake` backend, in `DiTPipeline` through `to_diffusers()`) and the export; mean PSNR per image. "
             f"W8 weights are symmetric (8-bit asymmetric codes do not fit int8). Activations `static`: each quantized "
             f"Linear's calibrated input grid as torchao's static int8 activation quantization (the attention matmuls, "
             f"quantized in accuquant, run in float in the export; `-attnfp`: a model quantized with them in "
             f"float); `float`: weights only. Call time: one transformer "
             f"call on 100 latents, as x FP's ({fp_call:.3f} s), {torch.get_num_threads()} threads, CPU: {cpu_name()}.",
             "", "| bits | activations | export vs quantized (dB) | quantized vs itself one image at a time (dB) | "
             "quantized vs FP (dB) | export vs FP (dB) | "
             "call time vs FP | transformer on disk: accuquant / torchao (MB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['activations']} | {r['psnr_export_vs_fake']:.2f} | "
                     f"{r['psnr_fake_vs_itself_batch1']:.2f} | "
                     f"{r['psnr_fake_vs_fp']:.2f} | {r['psnr_export_vs_fp']:.2f} | {r['call_vs_fp']:.2f}x | "
                     f"{r['accuquant_dir_mb']:.3f} / {r['torchao_dir_mb']:.3f} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
