"""Export to a plain diffusers directory whose quantized Linear weights are torchao tensors.

For a quantized pipeline whose quantized layers are all ``nn.Linear`` (DiT, SD3/MMDiT
transformers), :func:`save_torchao` writes the diffusers pipeline directory a user loads
with nothing but diffusers and torchao::

    pipe = DiTPipeline.from_pretrained(out, torch_dtype=torch.float32)   # or StableDiffusion3Pipeline

Each quantized Linear's weight becomes a torchao ``Int8Tensor`` holding the calibrated
codes (``q - zero_point``: asymmetric codes of up to 7 bits fold exactly into int8) and
the per-output-channel step sizes, so its dequantized weight is the ``fake`` backend's to
the bit. With ``activations="static"`` (the default) the tensor also carries the layer's
calibrated input grid as torchao's static per-tensor int8 activation quantization (an
asymmetric 8-bit grid ``[0, 255]`` with zero point ``z`` is torchao's ``[-128, 127]`` with
``z - 128``, the same codes), so the export runs the W*A8 Linear layers that were
calibrated, integer matmuls included; ``activations="float"`` exports the weights only.
The denoiser's ``config.json`` names the torchao config, which diffusers reads when it
loads. Only safetensors and JSON are written.

What torchao cannot express, and so is not exported: quantized convolutions (refused);
input grids other than one 8-bit per-tensor grid (per-token ranges, inputs below 8 bits,
split inputs; refused with ``activations="static"``); and accuquant's quantized attention
matmuls (Q, K, V, softmax), which run in floating point in the export. Its distance to the
``fake`` backend's samples is in the README.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import AccuQuantError
from ..quant.layers import quant_layers
from .files import atomic_dir

ACTIVATIONS = ("static", "float")


def _torchao():
    try:
        from diffusers import TorchAoConfig
        from diffusers.quantizers.torchao.torchao_quantizer import TorchAoHfQuantizer
        from torchao.quantization import Int8StaticActivationInt8WeightConfig, Int8Tensor, Int8WeightOnlyConfig
        from torchao.quantization.granularity import PerRow, PerTensor
        from torchao.quantization.quant_primitives import MappingType
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs
    except Exception as e:  # not installed, or an incompatible version
        raise AccuQuantError(f"the torchao export needs torchao and a diffusers that supports it "
                             f"(pip install 'accuquant[export]'): {type(e).__name__}: {e}") from None
    return dict(TorchAoConfig=TorchAoConfig, TorchAoHfQuantizer=TorchAoHfQuantizer, Int8Tensor=Int8Tensor,
                Int8WeightOnlyConfig=Int8WeightOnlyConfig, StaticConfig=Int8StaticActivationInt8WeightConfig,
                PerRow=PerRow, PerTensor=PerTensor, MappingType=MappingType, ActKwargs=QuantizeTensorToInt8Kwargs)


def _static_input(name: str, spec) -> bool:
    """Whether the layer's input is quantized, and by a grid torchao's static int8 takes."""
    if not spec.input_grids:
        return False  # the calibrated layer reads a float input: weights only is what it does
    (g,) = spec.input_grids  # split inputs are refused before
    why = ("its input is quantized per token" if g.per_token else
           f"its input grid has {g.bits} bits (torchao's static grid is int8)" if g.bits != 8 else
           "its input has more than one step size" if g.scale.numel() != 1 or g.group is not None else None)
    if why:
        raise AccuQuantError(f"{name}: {why}, which torchao's static activation quantization cannot express: "
                             "export with activations='float' (--activations float) for the weights only")
    return True


def _input_ndims(pipe, names: list[str]) -> dict[str, int]:
    """Each named layer's input rank, from one denoiser call: torchao's static activation
    step size must have the rank of the activation it quantizes."""
    if not names:
        return {}
    layers = quant_layers(pipe.model)
    seen: dict[str, int] = {}

    def hook(name):
        def record(module, args):
            seen.setdefault(name, args[0].dim())
        return record

    hooks = [layers[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        den = pipe.denoiser()
        device = next(pipe.model.parameters()).device
        x = torch.randn(1, *den.sample_shape, generator=torch.Generator().manual_seed(0)).to(device)
        t = pipe.solver().timesteps[0]
        with torch.inference_mode():
            den(x, t, pipe.conditions(1, device=device))
    except AccuQuantError as e:
        raise AccuQuantError(f"the static activation export runs the model once to see its layers' inputs: {e}")
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise AccuQuantError(f"{missing[0]}: not called by the denoiser, so its input rank is unknown")
    return seen


def torchao_model(pipe, activations: str = "static") -> nn.Module:
    """A fresh diffusers denoiser of ``pipe``'s class and config: its float tensors from the
    quantized model, each quantized Linear's weight a torchao ``Int8Tensor`` of its codes
    (with its static input grid when ``activations="static"``)."""
    ao = _torchao()
    if activations not in ACTIVATIONS:
        raise AccuQuantError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    if pipe.quant is None:
        raise AccuQuantError("only a quantized pipeline can be exported")
    layers = quant_layers(pipe.model)
    specs, static = {}, []
    for name, layer in layers.items():
        if not layer.weight_quant:
            continue
        spec = layer.spec()
        if spec.kind != "linear" or spec.split is not None:
            raise AccuQuantError(f"{name}: a quantized {spec.kind} has no torchao form; the torchao export takes "
                                 "models whose quantized layers are all Linear (keep the others in full precision)")
        if spec.outliers is not None:
            raise AccuQuantError(f"{name}: a layer with outlier transforms (smoothing, rotation, a low-rank branch) "
                                 "has no torchao form: quantize without outliers to export")
        if spec.weight_grids[0].group is not None:
            raise AccuQuantError(f"{name}: weights quantized per group of inputs have no torchao Int8Tensor form "
                                 "(one step size per output channel): quantize without weight_group to export")
        if activations == "static" and _static_input(name, spec):
            static.append(name)
        specs[name] = spec
    ndims = _input_ndims(pipe, static)
    fresh = type(pipe.model).from_config(pipe.model.config).to(torch.float32)
    wrapped = {f"{n}.module.": f"{n}." for n in layers}
    state = {}
    for key, t in pipe.model.state_dict().items():
        for src, dst in wrapped.items():
            if key.startswith(src):
                key = dst + key[len(src):]
                break
        state[key] = t
    own = fresh.state_dict()
    missing = [k for k in own if k not in state]
    expected = {f"{n}.weight" for n in specs}
    if set(missing) != expected:
        raise AccuQuantError(f"cannot map the quantized model onto {type(fresh).__name__}: "
                             f"{sorted(set(missing) ^ expected)[:3]}")
    fresh.load_state_dict({k: state[k].float() for k in own if k in state}, strict=False)
    for name, spec in specs.items():
        (g,) = spec.weight_grids
        z = g.zero_point.reshape(-1, 1) if g.zero_point.numel() > 1 else g.zero_point
        q = spec.weight_codes.to(torch.int32) - z.to(torch.int32)
        if q.min() < -128 or q.max() > 127:
            raise AccuQuantError(f"{name}: weight codes {int(q.min())}..{int(q.max())} do not fit int8 (8-bit "
                                 "asymmetric weights): quantize with weight_symmetric or fewer bits")
        out_ch = q.shape[0]
        scale = g.scale.detach().float().reshape(-1)
        scale = (scale.expand(out_ch) if scale.numel() == 1 else scale).reshape(out_ch, 1).contiguous()
        act = {}
        if name in ndims:
            (a,) = spec.input_grids
            shape = (1,) * ndims[name]
            # torchao's int8 grid is [-128, 127]: an unsigned grid moves its zero point by 128, a
            # symmetric one ([-127, 127]) keeps 0 and gains the code -128 (one more step at the low end)
            zp = a.zero_point.detach().reshape(()) - (0 if a.symmetric else 128)
            mapping = ao["MappingType"].SYMMETRIC if a.symmetric else ao["MappingType"].ASYMMETRIC
            act = dict(act_quant_scale=a.scale.detach().float().reshape(shape).clone(),
                       act_quant_zero_point=None if a.symmetric else zp.to(torch.int8).reshape(shape).clone(),
                       act_quant_kwargs=ao["ActKwargs"](granularity=ao["PerTensor"](), mapping_type=mapping))
        weight = ao["Int8Tensor"](q.to(torch.int8).contiguous(), scale, [1, q.shape[1]], torch.float32, **act)
        fresh.get_submodule(name).weight = nn.Parameter(weight, requires_grad=False)
    return fresh.eval()


def save_torchao(pipe, out: str | Path, overwrite: bool = False, activations: str = "static") -> None:
    """Write ``pipe`` (quantized, all quantized layers Linear) as a diffusers pipeline
    directory with torchao int8 weights and, with ``activations="static"``, the calibrated
    int8 input grids (see the module docstring). Nothing is left in ``out`` if writing fails."""
    ao = _torchao()
    model = torchao_model(pipe, activations)
    if activations == "static":
        # what config.json says; the step sizes themselves travel with each weight
        quant_type = ao["StaticConfig"](granularity=[ao["PerTensor"](), ao["PerRow"]()],
                                        act_mapping_type=ao["MappingType"].ASYMMETRIC)
    else:
        quant_type = ao["Int8WeightOnlyConfig"]()
    config = ao["TorchAoConfig"](quant_type)
    model.hf_quantizer = ao["TorchAoHfQuantizer"](config, pre_quantized=True)
    model.hf_quantizer.validate_environment()
    model.register_to_config(quantization_config=config)  # diffusers reads it back from config.json
    diffusers_pipe = pipe.to_diffusers()
    diffusers_pipe.register_modules(**{pipe.denoiser_name: model})
    with atomic_dir(Path(out), overwrite) as tmp:
        diffusers_pipe.save_pretrained(str(tmp))
