"""Saving and loading quantized models as directories.

Layout (a diffusers user recognises it; the denoiser folder holds integer weights)::

    out/
      accuquant.json                      quant config, method, splits, sampling defaults
      model_index.json                    the source pipeline's, when it had one
      scheduler/scheduler_config.json
      unet/config.json                    the base model's own diffusers config
      unet/accuquant_weights.safetensors  packed integer weight codes, scales and zero
                                          points, activation quantizers, float tensors
      vae/, text_encoder/, tokenizer/     other components, when the pipeline has them

Weight codes are stored as ``q - qmin`` (unsigned), packed 4 per byte at 2 bits, 2 per
byte at 3 and 4 bits, 1 per byte above. Only safetensors and JSON are written.
:func:`accuquant.loading.load_quantized` rebuilds the model, wraps it with the same
config, loads the codes and freezes it onto a backend: its outputs are bit-identical to
the in-memory quantized model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models import adapter_class
from ..errors import AccuQuantError
from ..quant.layers import quant_layers
from .files import atomic_dir, check_not_inside

QUANT_FILE = "accuquant.json"
WEIGHTS_FILE = "accuquant_weights.safetensors"
FORMAT = "accuquant.quantized/1"
SCALARS = "__scalars__"


def _slot_bits(bits: int) -> int:
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2^bits) into bytes, ``8 // slot`` per byte, little end first."""
    slot = _slot_bits(bits)
    per = 8 // slot
    flat = codes.reshape(-1).to(torch.uint8)
    if per == 1:
        return flat.clone()
    pad = (-flat.numel()) % per
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per).to(torch.int32)
    packed = torch.zeros(flat.shape[0], dtype=torch.int32)
    for k in range(per):
        packed |= flat[:, k] << (slot * k)
    return packed.to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    slot = _slot_bits(bits)
    per = 8 // slot
    n = 1
    for s in shape:
        n *= s
    if per == 1:
        return packed[:n].reshape(shape).clone()
    p = packed.to(torch.int32)
    mask = (1 << slot) - 1
    parts = torch.stack([(p >> (slot * k)) & mask for k in range(per)], dim=1).reshape(-1)
    return parts[:n].to(torch.uint8).reshape(shape)


def module_dtype(component):
    """The floating dtype of a module component, else ``None``."""
    if not isinstance(component, torch.nn.Module):
        return None
    return next((p.dtype for p in component.parameters() if p.is_floating_point()), None)


def _save_components(pipe, root: Path) -> None:
    import diffusers

    sched = pipe.diffusers_scheduler()
    sched.save_pretrained(str(root / "scheduler"))
    for name, comp in pipe.components.items():
        if hasattr(comp, "save_pretrained"):
            comp.save_pretrained(str(root / name))
    index = dict(pipe.model_index) if pipe.model_index else {
        "_class_name": adapter_class(pipe.model).pipeline_class,
        "_diffusers_version": diffusers.__version__,
        pipe.denoiser_name: ["diffusers", type(pipe.model).__name__],
        "scheduler": ["diffusers", type(sched).__name__],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def save_quantized(pipe, out: str | Path, overwrite: bool = False) -> None:
    """Write a quantized :class:`~accuquant.pipeline.Pipeline` to the directory ``out``.

    Nothing is left in ``out`` if writing fails.
    """
    if pipe.quant is None:
        raise AccuQuantError("only a quantized pipeline can be saved this way (call accuquant.quantize first)")
    check_not_inside(out, pipe.quant.base_model or pipe.source)  # never over the FP model it came from
    layers = quant_layers(pipe.model)
    if any(not layer.frozen and layer.weight_quant for layer in layers.values()):
        raise AccuQuantError("the model is not frozen; quantize() freezes it")
    for layer in layers.values():
        layer._need_codes()
    tensors, shapes, scalars = {}, {}, {}
    for key, t in pipe.model.state_dict().items():
        t = t.detach().cpu().contiguous()
        if key.endswith("zero_point"):
            t = t.to(torch.uint8)  # integers in [0, 255]; loading casts them back exactly
        if t.dim() == 0:
            scalars[key] = t.float()  # per-tensor quantizer parameters: one tensor, short header
        else:
            tensors[key] = t
    if scalars:
        tensors[SCALARS] = torch.stack(list(scalars.values()))
    for name, layer in layers.items():
        if layer.weight_codes is None:
            continue
        key = f"{name}.weight_codes"
        bits = max(q.bits for q in layer.weight_quant)
        tensors[key] = pack_codes(layer.weight_codes.cpu(), bits)
        shapes[key] = {"shape": list(layer.weight_codes.shape), "bits": bits}
    with atomic_dir(Path(out), overwrite) as tmp:
        sub = tmp / pipe.denoiser_name
        pipe.model.save_config(str(sub))
        save_file(tensors, str(sub / WEIGHTS_FILE), metadata={"format": FORMAT, "codes": json.dumps(shapes),
                                                                  "scalars": json.dumps(list(scalars))})
        _save_components(pipe, tmp)
        meta = {
            "format": FORMAT,
            "denoiser": pipe.denoiser_name,
            "denoiser_class": type(pipe.model).__name__,
            "sampling": pipe.defaults.to_dict(),
            **pipe.quant.to_dict(),
            "component_dtypes": {k: str(module_dtype(c)).removeprefix("torch.") for k, c in pipe.components.items()
                                 if module_dtype(c) is not None},
            "base_model": pipe.quant.base_model or pipe.source,
        }
        (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=2, default=str))
