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
Loading rebuilds the model, wraps it with the same config and loads the codes: its
outputs are bit-identical to the in-memory quantized model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import QuantConfig
from .errors import AccuQuantError
from .layers import quant_layers, wrap_model
from .safety import atomic_dir, check_safetensors

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


def _save_components(pipe, root: Path) -> None:
    import diffusers

    sched_cls = pipe.scheduler_config.get("_class_name", "DDIMScheduler")
    sched = getattr(diffusers, sched_cls, diffusers.DDIMScheduler).from_config(pipe.scheduler_config)
    sched.save_pretrained(str(root / "scheduler"))
    for name, comp in pipe.components.items():
        if hasattr(comp, "save_pretrained"):
            comp.save_pretrained(str(root / name))
    index = dict(pipe.model_index) if pipe.model_index else {
        "_class_name": "DDIMPipeline",
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
    layers = quant_layers(pipe.model)
    if any(not layer.frozen and layer.weight_quant for layer in layers.values()):
        raise AccuQuantError("the model is not frozen; quantize() freezes it")
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
            "sampling": {"guidance_scale": pipe.defaults.guidance_scale, "num_classes": pipe.defaults.num_classes,
                         "null_class": pipe.defaults.null_class},
            "base_model": pipe.source,
            **pipe.quant,
        }
        (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=2, default=str))


def load_quantized(root: str | Path, device: str = "cpu"):
    """Load a directory written by :func:`save_quantized`."""
    try:
        return _load_quantized(Path(root), device)
    except AccuQuantError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise AccuQuantError(f"{root}: not a valid accuquant model ({type(e).__name__}: {e})") from None


def _load_quantized(root: Path, device: str):
    import diffusers

    from .adapters import ADAPTERS
    from .pipeline import Pipeline, SamplingDefaults, _load_component, _read_json

    meta = _read_json(root / QUANT_FILE)
    if meta.get("format") != FORMAT:
        raise AccuQuantError(f"{root / QUANT_FILE}: unknown format {meta.get('format')!r}")
    name, cls_name = meta["denoiser"], meta["denoiser_class"]
    if cls_name not in ADAPTERS:
        raise AccuQuantError(f"{root}: unsupported denoiser {cls_name}")
    cfg = QuantConfig.from_dict(meta["config"])
    wfile = root / name / WEIGHTS_FILE
    check_safetensors(wfile)
    model = getattr(diffusers, cls_name).from_config(_read_json(root / name / "config.json"))
    wrap_model(model, cfg, {k: int(v) for k, v in meta.get("splits", {}).items()})
    try:
        with safe_open(str(wfile), "pt") as f:
            md = f.metadata() or {}
        shapes = json.loads(md.get("codes", "{}"))
        scalar_names = json.loads(md.get("scalars", "[]"))
        tensors = load_file(str(wfile))
    except Exception as e:
        raise AccuQuantError(f"{wfile}: cannot read ({e})") from None
    if scalar_names:
        values = tensors.pop(SCALARS)
        tensors.update({k: values[i] for i, k in enumerate(scalar_names)})
    for lname, layer in quant_layers(model).items():
        key = f"{lname}.weight_codes"
        if key not in shapes:
            continue
        info = shapes[key]
        expected = tuple(layer.module.weight.shape)
        if tuple(info["shape"]) != expected or info["bits"] != max(q.bits for q in layer.weight_quant):
            raise AccuQuantError(f"{wfile}: codes of {lname} do not match the model ({info} vs {expected})")
        tensors[key] = unpack_codes(tensors[key], info["bits"], tuple(info["shape"]))
        layer.weight_codes = torch.empty(tuple(info["shape"]), dtype=torch.uint8)
        del layer.module.weight
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise AccuQuantError(f"{wfile}: does not match the model ({str(e).splitlines()[0]})") from None
    components = {}
    index = _read_json(root / "model_index.json") if (root / "model_index.json").is_file() else None
    for comp, spec in (index or {}).items():
        if comp.startswith("_") or comp in (name, "scheduler") or not isinstance(spec, list) or spec[0] is None:
            continue
        if (root / comp).is_dir():
            components[comp] = _load_component(root / comp, spec[0], spec[1])
    sched = dict(_read_json(root / "scheduler" / "scheduler_config.json"))
    quant = {k: v for k, v in meta.items() if k not in ("format", "denoiser", "denoiser_class", "sampling")}
    pipe = Pipeline(model.eval(), sched, components, name, SamplingDefaults.from_dict(meta.get("sampling", {})),
                    index, quant=quant, source=str(root))
    return pipe.to(device)
