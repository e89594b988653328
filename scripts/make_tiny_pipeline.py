"""Save a tiny, randomly initialised DDPM pipeline (a UNet2DModel with attention) to a folder.

Used by the quick start until the bundled trained model is in place: it exercises every
part of the tool (wrapping, calibration, saving, sampling); its samples are noise.

    python scripts/make_tiny_pipeline.py runs/tiny-pipeline
"""

import sys

import diffusers
import torch


def main(out: str) -> None:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    )
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler()).save_pretrained(out)
    print(f"saved a tiny pipeline ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters) to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-pipeline")
