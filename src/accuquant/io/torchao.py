"""Export to a plain diffusers directory whose quantized Linear weights are torchao tensors.

For a quantized pipeline whose quantized layers are all ``nn.Linear`` (DiT, SD3/MMDiT
transformers), :func:`save_torchao` writes the diffusers pipeline directory a user loads
with nothing but diffusers and torchao::

    pipe = DiTPipeline.from_pretrained(out, torch_dtype=torch.float32)   # or StableDiffusion3Pipeline

Each quantized Linear's weight becomes a torchao ``Int8Tensor`` holding the calibrated
codes (``q - zero_point``: asymmetric codes of up to 7 bits fold exactly into int8) and
the per-output-channel step sizes, so its dequantized weight is the ``fake`` backend's to
the bit; the denoiser's ``config.json`` names the torchao config (int8 weight-only), which
diffusers reads when it loads. Only safetensors and JSON are written.

What the export leaves out: activations run in floating point (torchao's static
activation grid is symmetric and per layer; accuquant's activation and attention-matmul
grids are not carried over), so the exported model is the weight-quantized network, not
the W*A8 one that was calibrated; its distance to the ``fake`` backend's samples is in the
README. Quantized convolutions have no torchao form: such a model is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import AccuQuantError
from ..quant.layers import quant_layers
from .files import atomic_dir


def _torchao():
    try:
        from diffusers import TorchAoConfig
        from diffusers.quantizers.torchao.torchao_quantizer import TorchAoHfQuantizer
        from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig
    except Exception as e:  # not installed, or an incompatible version
        raise AccuQuantError(f"the torchao export needs torchao and a diffusers that supports it "
                             f"(pip install 'accuquant[export]'): {type(e).__name__}: {e}") from None
    return TorchAoConfig, TorchAoHfQuantizer, Int8Tensor, Int8WeightOnlyConfig


def torchao_model(pipe) -> nn.Module:
    """A fresh diffusers denoiser of ``pipe``'s class and config: its float tensors from the
    quantized model, each quantized Linear's weight a torchao ``Int8Tensor`` of its codes."""
    _, _, Int8Tensor, _ = _torchao()
    if pipe.quant is None:
        raise AccuQuantError("only a quantized pipeline can be exported")
    layers = quant_layers(pipe.model)
    specs = {}
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
        specs[name] = spec
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
        weight = Int8Tensor(q.to(torch.int8).contiguous(), scale, [1, q.shape[1]], torch.float32)
        fresh.get_submodule(name).weight = nn.Parameter(weight, requires_grad=False)
    return fresh.eval()


def save_torchao(pipe, out: str | Path, overwrite: bool = False) -> None:
    """Write ``pipe`` (quantized, all quantized layers Linear) as a diffusers pipeline
    directory with torchao int8 weights (see the module docstring). Nothing is left in
    ``out`` if writing fails."""
    TorchAoConfig, TorchAoHfQuantizer, _, Int8WeightOnlyConfig = _torchao()
    model = torchao_model(pipe)
    config = TorchAoConfig(Int8WeightOnlyConfig())
    model.hf_quantizer = TorchAoHfQuantizer(config, pre_quantized=True)
    model.hf_quantizer.validate_environment()
    model.register_to_config(quantization_config=config)  # diffusers reads it back from config.json
    diffusers_pipe = pipe.to_diffusers()
    diffusers_pipe.register_modules(**{pipe.denoiser_name: model})
    with atomic_dir(Path(out), overwrite) as tmp:
        diffusers_pipe.save_pretrained(str(tmp))
