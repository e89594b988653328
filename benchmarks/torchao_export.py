"""The torchao export of the bundled mnist-dit: how far its images are from the quantized
model's (fake backend) and from FP, all three run by diffusers' own ``DiTPipeline``.

It quantizes mnist-dit (naive, W4A8 and W8A8; cheap, and the export carries whatever
codes a method chose), exports each with ``accuquant.save_torchao``, loads the export with
plain ``DiTPipeline.from_pretrained``, and samples ``--num`` images (balanced labels,
``--steps`` DDIM steps, one seeded generator per batch, the same for every model). PSNR
is over the decoded images in [0, 1], per image, then averaged; sizes are the files on disk.

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
from common import ROOT


def images(pipe, num: int, steps: int, guidance: float) -> torch.Tensor:
    out = []
    for start in range(0, num, 50):
        labels = [k % 10 for k in range(start, min(num, start + 50))]
        out.append(pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                        generator=torch.Generator().manual_seed(start)).images)
    return torch.cat(out).float().clamp(0, 1)


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main() -> None:
    import diffusers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--bits", default="w4a8,w8a8")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "torchao_export.json"))
    args = p.parse_args()
    fp = aq.load("mnist-dit")
    guidance = fp.defaults.guidance_scale
    ref = images(fp.to_diffusers(), args.num, args.steps, guidance)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits.split(","):
            w, a = (int(v) for v in bits[1:].split("a"))
            q = aq.quantize("mnist-dit", aq.QuantConfig(weight_bits=w, act_bits=a, weight_symmetric=w == 8), "naive",
                            steps=args.steps, progress=False)
            q.save(Path(tmp) / bits)
            aq.save_torchao(q, Path(tmp) / f"{bits}-torchao")
            exported = diffusers.DiTPipeline.from_pretrained(str(Path(tmp) / f"{bits}-torchao"),
                                                             torch_dtype=torch.float32)
            fake = images(aq.load(Path(tmp) / bits).to_diffusers(), args.num, args.steps, guidance)
            ex = images(exported, args.num, args.steps, guidance)
            rows.append({"bits": bits, "weight_symmetric": w == 8,
                         "psnr_export_vs_fake": psnr(ex, fake).clamp(max=99).mean().item(),
                         "psnr_fake_vs_fp": psnr(fake, ref).clamp(max=99).mean().item(),
                         "psnr_export_vs_fp": psnr(ex, ref).clamp(max=99).mean().item(),
                         "accuquant_dir_mb": round(size_mb(Path(tmp) / bits / "transformer"), 3),
                         "torchao_dir_mb": round(size_mb(Path(tmp) / f"{bits}-torchao" / "transformer"), 3)})
            print(rows[-1], flush=True)
    res = {"model": "mnist-dit", "method": "naive", "num": args.num, "steps": args.steps, "guidance": guidance,
           "fp_transformer_mb": round(size_mb(Path(fp.source) / "transformer"), 3) if fp.source else None,
           "rows": rows}
    Path(args.out).write_text(json.dumps(res, indent=2))
    lines = [f"Written by benchmarks/torchao_export.py: mnist-dit quantized with the naive method, exported with "
             f"`accuquant.save_torchao`, loaded with plain `DiTPipeline.from_pretrained`; {args.num} images "
             f"({args.steps} DDIM steps, guidance {guidance}) from the same generators for FP, the quantized model "
             f"(`fake` backend, in `DiTPipeline` through `to_diffusers()`) and the export; mean PSNR per image. "
             f"W8 weights are symmetric (8-bit asymmetric codes do not fit int8).", "",
             "| bits | export vs quantized (dB) | quantized vs FP (dB) | export vs FP (dB) | transformer on disk: "
             "accuquant / torchao (MB) |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['psnr_export_vs_fake']:.2f} | {r['psnr_fake_vs_fp']:.2f} | "
                     f"{r['psnr_export_vs_fp']:.2f} | {r['accuquant_dir_mb']:.3f} / {r['torchao_dir_mb']:.3f} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
