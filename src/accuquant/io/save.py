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
from ..quant.lora import has_lora
from ..quant.layers import quant_layers
from .files import atomic_dir, check_not_inside

QUANT_FILE = "accuquant.json"
WEIGHTS_FILE = "accuquant_weights.safetensors"
FORMAT = "accuquant.quantized/1"
SCALARS = "__scalars__"


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
    if has_lora(pipe.model):
        raise AccuQuantError("a LoRA is loaded on this model; it is not part of the quantized model: unload it "
                             "(unload_lora_weights) before saving, and load it again after")
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
    for name, layer in layers.items():  # the state dict holds their packed codes
        if layer.frozen:
            shapes[f"{name}.weight_codes"] = {"shape": list(layer.codes_shape), "bits": layer.codes_bits}
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
