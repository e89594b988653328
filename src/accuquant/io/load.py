"""Loading pipelines: diffusers directories, hub ids, in-memory diffusers objects, and
quantized directories written by :mod:`accuquant.export`.

A quantized directory is rebuilt as the quantize step leaves a model: the diffusers
model from its config, wrapped with the saved quant config, its integer codes and
quantizer parameters loaded, and every layer frozen onto the chosen backend
(:mod:`accuquant.backends`), so its outputs are bit-identical to the in-memory model's.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..models import ADAPTERS, adapter_class, denoiser_names, unsupported
from ..backends import get_backend
from ..bundled import model_ref, resolve_ref
from ..errors import AccuQuantError
from .save import FORMAT, QUANT_FILE, SCALARS, WEIGHTS_FILE, module_dtype
from ..quant.packing import packed_numel
from ..quant.layers import freeze_model, quant_layers, wrap_model
from ..methods import METHODS
from ..methods.corrections import Correction
from ..pipeline import SAMPLING_FILE, Pipeline, QuantRecord, SamplingDefaults
from ..errors import check_finite
from .safetensors import check_safetensors

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: pipeline components accuquant neither uses nor saves (a safety checker is 1.2 GB)
SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
#: the floating dtypes a denoiser can be quantized in, and saved and loaded back in, by name
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _load_component(path: Path, library: str, class_name: str):
    for f in sorted(path.glob("*.safetensors")):
        check_safetensors(f)
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        raise AccuQuantError(f"{path}: needs {library}.{class_name}, which is not installed") from None
    import diffusers

    # Without `accelerate`, diffusers warns at every load unless told not to try; a model with
    # layers kept in float32 (Wan's `_keep_in_fp32_modules`) cannot load that way.
    kwargs = {"low_cpu_mem_usage": False} if isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin) \
        and not getattr(cls, "_keep_in_fp32_modules", None) else {}
    try:
        return cls.from_pretrained(str(path), **kwargs)
    except AccuQuantError:
        raise
    except Exception as e:  # diffusers/transformers raise many types; report one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AccuQuantError(f"{path}: cannot load {class_name} ({msg})") from None


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AccuQuantError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise AccuQuantError(f"{path}: expected a JSON object")
    return d


def _defaults(root: Path) -> SamplingDefaults:
    f = root / SAMPLING_FILE
    return SamplingDefaults.from_dict(_read_json(f), str(f)) if f.is_file() else SamplingDefaults()


def _default_scheduler_config() -> dict:
    import diffusers

    return dict(diffusers.DDIMScheduler().config)


def load_pipeline(path: str | Path, device: str = "cpu", backend: str = "fake") -> Pipeline:
    """Load a pipeline from a diffusers pipeline directory, a model directory, an accuquant
    quantized directory, or a hub id (from the local hub cache when it is there, else
    downloaded by diffusers on machines that can).

    ``backend`` runs the layers of a quantized model (:mod:`accuquant.backends`).

    Raises:
        AccuQuantError: the path is not a diffusers model, or a file in it is corrupt.
    """
    get_backend(backend)
    root = Path(resolve_ref(str(path)))
    if not root.exists():
        if _HUB_ID.match(str(path)):
            import diffusers

            try:  # the local cache first: no network needed, and no time lost on a machine without it
                root = Path(diffusers.DiffusionPipeline.download(str(path), local_files_only=True))
            except Exception:
                try:
                    root = Path(diffusers.DiffusionPipeline.download(str(path)))
                except Exception as e:
                    raise AccuQuantError(f"{path}: not a local directory, not in the hub cache, and the hub download "
                                         f"failed ({type(e).__name__})") from None
        else:
            raise AccuQuantError(f"{path}: no such file or directory")
    if not root.is_dir():
        raise AccuQuantError(f"{path}: not a diffusers model directory")
    if (root / QUANT_FILE).is_file():
        return load_quantized(root, device=device, backend=backend)
    if (root / "model_index.json").is_file():
        index = _read_json(root / "model_index.json")
        name = next((n for n in denoiser_names() if n in index), None)
        if name is None:
            raise AccuQuantError(f"{path}: the pipeline has no 'unet' or 'transformer' component")
        components = {}
        sched = None
        for comp, spec in index.items():
            if comp.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
                continue
            if comp == "scheduler":
                sched = dict(_read_json(root / comp / "scheduler_config.json"))
                continue
            if comp == name and spec[1] not in ADAPTERS:
                raise AccuQuantError(f"{path}: {unsupported(spec[1])}")
            if comp in SKIPPED_COMPONENTS:
                continue
            components[comp] = _load_component(root / comp, spec[0], spec[1])
        model = components.pop(name)
        pipe = Pipeline(model, sched or _default_scheduler_config(), components, name, _defaults(root), index,
                        source=model_ref(root))
    elif (root / "config.json").is_file():
        cfg = _read_json(root / "config.json")
        cls = cfg.get("_class_name")
        if cls not in ADAPTERS:
            raise AccuQuantError(f"{path}: {unsupported(str(cls))}")
        model = _load_component(root, "diffusers", cls)
        sched_file = root / "scheduler_config.json"
        sched = dict(_read_json(sched_file)) if sched_file.is_file() else _default_scheduler_config()
        pipe = Pipeline(model, sched, {}, adapter_class(cls).component, _defaults(root), source=model_ref(root))
    else:
        raise AccuQuantError(f"{path}: not a diffusers model directory (no model_index.json or config.json)")
    check_finite(pipe.model, str(path))
    pipe.model.eval()
    return pipe.to(device)


def as_pipeline(source, copy_model: bool = True) -> Pipeline:
    """A :class:`Pipeline` from a path, a :class:`Pipeline`, a diffusers pipeline or a diffusers model."""
    if isinstance(source, (str, Path)):
        return load_pipeline(source)
    if isinstance(source, Pipeline):
        return source.copy() if copy_model else source
    if isinstance(source, nn.Module):
        model = copy.deepcopy(source) if copy_model else source
        return Pipeline(model.eval(), _default_scheduler_config())
    for name in denoiser_names():
        model = getattr(source, name, None)
        if isinstance(model, nn.Module):
            comps = {k: v for k, v in getattr(source, "components", {}).items()
                     if k not in (name, "scheduler", *SKIPPED_COMPONENTS) and v is not None}
            model = copy.deepcopy(model) if copy_model else model
            index = {k: v for k, v in dict(getattr(source, "config", {}) or {}).items() if k not in SKIPPED_COMPONENTS}
            index["_class_name"] = type(source).__name__
            sched = {**source.scheduler.config, "_class_name": type(source.scheduler).__name__}  # the solver's default
            return Pipeline(model.eval(), sched, comps, name, model_index=index)
    raise AccuQuantError(f"cannot quantize a {type(source).__name__}: expected a path, a diffusers pipeline or model")


def load_quantized(root: str | Path, device: str = "cpu", backend: str = "fake") -> Pipeline:
    """Load a directory written by :func:`accuquant.export.save_quantized`, its layers run by ``backend``."""
    get_backend(backend)
    try:
        return _load_quantized(Path(root), device, backend)
    except AccuQuantError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise AccuQuantError(f"{root}: not a valid accuquant model ({type(e).__name__}: {e})") from None


def _load_quantized(root: Path, device: str, backend: str) -> Pipeline:
    import diffusers

    meta = _read_json(root / QUANT_FILE)
    if meta.get("format") != FORMAT:
        raise AccuQuantError(f"{root / QUANT_FILE}: unknown format {meta.get('format')!r}")
    method, version = meta.get("method"), meta.get("method_version")
    if method in METHODS and isinstance(version, int) and version > METHODS[method].Config.VERSION:
        raise AccuQuantError(f"{root}: made by a newer accuquant ({method} version {version}; this one knows up to "
                             f"{METHODS[method].Config.VERSION}): upgrade accuquant to load it")
    name, cls_name = meta["denoiser"], meta["denoiser_class"]
    if cls_name not in ADAPTERS:
        raise AccuQuantError(f"{root}: unsupported denoiser {cls_name}")
    record = QuantRecord.from_dict({k: v for k, v in meta.items() if k not in ("format", "denoiser", "denoiser_class",
                                                                              "sampling")})
    if record.correction:  # refused now if unknown or newer, not at the first sampling
        Correction.from_dict(record.correction, str(root / QUANT_FILE))
    wfile = root / name / WEIGHTS_FILE
    check_safetensors(wfile)
    # every saved tensor is loaded below: no random initialisation, so the float weights
    # of the quantized layers, dropped unread, never take memory
    from diffusers.models.modeling_utils import no_init_weights

    with no_init_weights():
        model = getattr(diffusers, cls_name).from_config(_read_json(root / name / "config.json"))
    # what was quantized comes from the record (layers by keep_fp, attention modules by
    # name), not from today's adapter of the family
    wrap_model(model, record.config, record.splits, attention=record.report.attention,
               folded=record.report.rotation_folded)
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
        if (tuple(info["shape"]) != expected or info["bits"] != layer.codes_bits
                or tensors[key].shape != (packed_numel(layer.codes_bits, expected),)):
            raise AccuQuantError(f"{wfile}: codes of {lname} do not match the model ({info} vs {expected})")
        layer.weight_codes, layer.codes_shape = torch.empty_like(tensors[key]), expected  # packed, as in memory
        del layer.module.weight
    # the file's tensors become the model's (no second copy while loading); zero points are
    # saved as uint8 and held as float32
    tensors = {k: v.float() if k.endswith("zero_point") else v for k, v in tensors.items()}
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise AccuQuantError(f"{wfile}: does not match the model ({str(e).splitlines()[0]})") from None
    del tensors  # the model holds them now: a kernel that takes the only copy of a layer's codes frees them
    dtype = meta.get("dtype", "float32")
    if dtype not in DTYPES:
        raise AccuQuantError(f"{root / QUANT_FILE}: unknown dtype {dtype!r}")
    if DTYPES[dtype] != torch.float32:  # (diffusers warns at any .to(dtype), even a no-op)
        model.to(DTYPES[dtype])
    freeze_model(model, backend)
    components = {}
    index = _read_json(root / "model_index.json") if (root / "model_index.json").is_file() else None
    saved_dtypes = meta.get("component_dtypes", {})
    for comp, spec in (index or {}).items():
        if comp.startswith("_") or comp in (name, "scheduler", *SKIPPED_COMPONENTS) or not isinstance(spec, list) \
                or spec[0] is None:
            continue
        if (root / comp).is_dir():
            c = _load_component(root / comp, spec[0], spec[1])
            want = DTYPES.get(saved_dtypes.get(comp))
            if isinstance(c, nn.Module) and want is not None and want != module_dtype(c):  # each in the dtype it had
                c = c.to(want)
            components[comp] = c
    sched = dict(_read_json(root / "scheduler" / "scheduler_config.json"))
    defaults = SamplingDefaults.from_dict(meta.get("sampling", {}), str(root / QUANT_FILE))
    pipe = Pipeline(model.eval(), sched, components, name, defaults, index, quant=record, source=str(root))
    return pipe.to(device)
