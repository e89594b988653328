"""``accuquant export``: a quantized model as a plain diffusers directory (torchao int8 weights and,
by default, its static int8 input grids)."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    x = sub.add_parser("export", help="write a quantized model as a plain diffusers directory (torchao int8 "
                       "weights) that loads without accuquant")
    x.add_argument("--model", required=True, help="accuquant output directory (quantized layers all Linear: DiT, SD3)")
    x.add_argument("--out", required=True, help="output directory (not the model's own, nor one inside it or "
                   "holding it)")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    x.add_argument("--activations", choices=("static", "float"), default="static",
                   help="static: each quantized Linear's calibrated 8-bit input grid as torchao's static int8 "
                   "activation quantization (W*A8 as calibrated, attention matmuls in float); float: the weights "
                   "only (default: static)")


def run(args) -> None:
    from ..io.files import check_not_inside, check_out_dir
    from ..io.load import load_pipeline
    from ..io.torchao import save_torchao

    out = Path(args.out)
    check_not_inside(out, args.model)
    check_out_dir(out, args.overwrite, "--overwrite")
    pipe = load_pipeline(args.model)
    save_torchao(pipe, out, overwrite=args.overwrite, activations=args.activations)
    print(f"wrote {out}: load it with {pipe.to_diffusers().__class__.__name__}.from_pretrained"
          f"('{out}', torch_dtype=torch.float32) (diffusers and torchao)")
