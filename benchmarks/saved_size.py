"""Size of a saved quantized model's weight file against the FP32 safetensors of the same model.

Writes benchmarks/results/saved_size.json. Run: python benchmarks/saved_size.py
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import diffusers
import torch

import accuquant as aq

MODELS = {
    # the quick start's tiny pipeline denoiser (3 resolutions, attention at one)
    "unet2d-small": dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
                        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                        attention_head_dim=16),
    # a wider two-resolution UNet, as in the tests
    "unet2d-wide": dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(64, 128),
                        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8),
}


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, cfg in MODELS.items():
            torch.manual_seed(0)
            model = diffusers.UNet2DModel(**cfg).eval()
            model.save_pretrained(str(tmp / name / "fp"))
            fp = os.path.getsize(tmp / name / "fp" / "diffusion_pytorch_model.safetensors")
            params = sum(p.numel() for p in model.parameters())
            for bits in (8, 4, 3, 2):
                pipe = aq.Pipeline(model, dict(diffusers.DDIMScheduler().config))
                q = aq.quantize(pipe, aq.QuantConfig(weight_bits=bits, act_bits=8), "naive", steps=2, calib_samples=2,
                                progress=False, use_cache=False)
                out = tmp / name / f"w{bits}"
                q.save(out)
                size = os.path.getsize(out / "unet" / "accuquant_weights.safetensors")
                rows.append({"model": name, "parameters": params, "weight_bits": bits, "fp32_bytes": fp,
                             "quantized_bytes": size, "ratio": round(size / fp, 4)})
                print(f"{name:13s} W{bits}: {size / fp:.3f} of FP32 ({size} / {fp} bytes)")
    out = Path(__file__).parent / "results" / "saved_size.json"
    out.write_text(json.dumps({"torch": torch.__version__, "diffusers": diffusers.__version__, "rows": rows}, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
