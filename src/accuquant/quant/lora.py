"""LoRA adapters on a (quantized) model, without re-quantizing it.

A user's LoRA (the diffusers/PEFT format: ``<module>.lora_A.weight`` and
``<module>.lora_B.weight``, optionally under the denoiser's prefix, ``unet.`` or
``transformer.``; also ``lora_down``/``lora_up`` or ``lora.down``/``lora.up`` with an
``alpha``) becomes a floating-point branch beside each layer it targets: the layer's
output plus ``strength * alpha / r * B(A(x))``, where ``x`` is the layer's float input
(before any input quantization or outlier transform). It runs the same on every backend,
since it only reads the layer's input and adds to its output (a forward hook), and leaves
the quantized weights, their codes and the saved model untouched.

Everything is checked before anything is attached: a LoRA for another architecture (a
module the model does not have, or of another shape) or whose rank does not fit is refused
in one line, and the model is left as it was.

Fusing (:func:`fuse_lora`) adds ``B A`` into the float weight of layers kept in full
precision, keeping the original to restore exactly (:func:`unfuse_lora`); a quantized
layer's weight is integer codes that the delta would have to be re-quantized into, which is
not exact, so its branch stays beside it.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import cache
from ..errors import AccuQuantError

#: the state-dict key patterns of one adapter's factors: (down, up)
_PATTERNS = ((".lora_A.weight", ".lora_B.weight"), (".lora_A.default.weight", ".lora_B.default.weight"),
             (".lora_down.weight", ".lora_up.weight"), (".lora.down.weight", ".lora.up.weight"))


class LoraBranch(nn.Module):
    """``scale * strength * B(A(x))`` for a Linear or Conv2d layer (A takes the layer's kernel,
    stride, padding and dilation; B is 1x1)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float, conv: dict | None = None):
        super().__init__()
        self.down = nn.Parameter(down, requires_grad=False)
        self.up = nn.Parameter(up, requires_grad=False)
        self.conv = conv
        # in the state dict, so that a model's fingerprint (its cached samples) follows them
        self.register_buffer("lora_scale", torch.tensor(float(scale)))
        self.register_buffer("lora_strength", torch.tensor(1.0))
        #: the layer's float weight before fusing (only while fused)
        self.unfused: torch.Tensor | None = None

    scale = property(lambda self: self.lora_scale.item())

    @property
    def strength(self) -> float:
        return self.lora_strength.item()

    @strength.setter
    def strength(self, value: float) -> None:
        self.lora_strength.fill_(float(value))

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """``scale * strength * B A`` in the layer's weight shape."""
        d = self.up.reshape(self.up.shape[0], -1) @ self.down.reshape(self.rank, -1)
        return (self.scale * self.strength) * d.reshape(self.up.shape[0], *self.down.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if self.conv is None:
            h = F.linear(F.linear(x, down), up)
        else:
            h = F.conv2d(F.conv2d(x, down, None, **self.conv), up)
        return h * (self.scale * self.strength)


def _add_branches(module: nn.Module, args, out):
    x = args[0]
    for b in module.lora_adapters.values():
        if b.strength != 0 and b.unfused is None:
            out = out + b(x)
    return out


def read_lora(source) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of a LoRA: a ``.safetensors`` file, a directory holding one
    (``pytorch_lora_weights.safetensors`` or the only one), or a state dict."""
    if isinstance(source, dict):
        return dict(source), {}
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        named = [f for f in files if f.name == "pytorch_lora_weights.safetensors"]
        if len(named) != 1 and len(files) != 1:
            raise AccuQuantError(f"{path}: expected one .safetensors LoRA file in it, found {len(files)}")
        path = (named or files)[0]
    if not path.is_file():
        raise AccuQuantError(f"{path}: no such LoRA file")
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception as e:
        raise AccuQuantError(f"{path}: cannot read it as a safetensors LoRA ({str(e).splitlines()[0]})") from None


def _default_alpha(meta: dict) -> float | None:
    """``lora_alpha / r`` from a PEFT adapter config in the file's metadata, else ``None``."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except ValueError:
        return None
    cfg = next((v for v in cfg.values() if isinstance(v, dict)), cfg) if "r" not in cfg else cfg
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    return float(alpha) / float(r) if r and alpha else None


def parse_lora(tensors: dict[str, torch.Tensor], meta: dict | None = None, prefix: str | None = None
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per target module name: ``(A, B, alpha / r)``, with the denoiser's ``prefix`` (and a
    leading ``unet.`` or ``transformer.``) taken off the names. A file's text-encoder
    entries (``text_encoder*.``) are left out, with a warning: only the denoiser's apply."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    ratio = _default_alpha(meta or {})
    text = [k for k in tensors if k.startswith("text_encoder")]
    if text:
        warnings.warn(f"LoRA: {len(text)} text-encoder entries left out (only the denoiser's adapters apply)",
                      stacklevel=2)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("text_encoder")}
    used = set()
    for key in tensors:
        for down_s, up_s in _PATTERNS:
            if not key.endswith(down_s):
                continue
            name = key[: -len(down_s)]
            up_key = name + up_s
            if up_key not in tensors:
                raise AccuQuantError(f"LoRA: {key} has no {up_s[1:]} beside it")
            down, up = tensors[key], tensors[up_key]
            alpha = tensors.get(name + ".alpha")
            r = down.shape[0]
            scale = float(alpha) / r if alpha is not None else (ratio if ratio is not None else 1.0)
            for p in filter(None, (prefix, "unet", "transformer")):
                if name.startswith(p + "."):
                    name = name[len(p) + 1:]
                    break
            out[name] = (down, up, scale)
            used.update({key, up_key, name + ".alpha"})
    if not out:
        raise AccuQuantError("LoRA: no adapter weights in it (expected keys ending in lora_A.weight and "
                             "lora_B.weight, the diffusers/PEFT format)")
    other = [k for k in tensors if k not in used and not re.search(r"\.alpha$", k)]
    if other:
        raise AccuQuantError(f"LoRA: {len(other)} entries that are not adapter factors (first: {other[0]})")
    return out


def _shape_of(module: nn.Module) -> tuple[str, int, int, tuple]:
    """``(kind, in, out, kernel)`` of a Linear or Conv2d, or of the one a QuantLayer wraps."""
    m = getattr(module, "module", module)
    if isinstance(m, nn.Linear):
        return "linear", m.in_features, m.out_features, ()
    if isinstance(m, nn.Conv2d) and m.groups == 1:
        return "conv2d", m.in_channels, m.out_channels, tuple(m.kernel_size)
    return type(m).__name__, 0, 0, ()


def load_lora(model: nn.Module, source, adapter_name: str = "default", strength: float = 1.0,
              prefix: str | None = None) -> list[str]:
    """Attach a LoRA to ``model`` (a diffusers denoiser, quantized or not) as adapter
    ``adapter_name`` at ``strength``; returns the names of the layers it targets.

    Raises:
        AccuQuantError: the LoRA is unreadable, targets a module the model lacks or has
            another shape than the model's, or its rank does not fit; nothing is attached.
    """
    if not adapter_name or "." in adapter_name or hasattr(nn.ModuleDict, adapter_name):
        raise AccuQuantError(f"LoRA adapter name {adapter_name!r}: not a name a module can hold; choose another")
    tensors, meta = read_lora(source)
    factors = parse_lora(tensors, meta, prefix)
    modules = dict(model.named_modules())
    plan = []
    cls = type(model).__name__
    for name, (down, up, scale) in factors.items():
        target = modules.get(name)
        if target is None:
            raise AccuQuantError(f"LoRA for another model: {name} is not a layer of this {cls}")
        kind, n_in, n_out, kernel = _shape_of(target)
        if kind not in ("linear", "conv2d"):
            raise AccuQuantError(f"LoRA for another model: {name} is a {kind} in this {cls}, not a Linear or Conv2d")
        r = down.shape[0]
        want_down = (r, n_in, *kernel)
        want_up = (n_out, r) + ((1, 1) if kind == "conv2d" else ())
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            if down.shape[1:] == want_down[1:] and up.shape[0] == n_out:
                raise AccuQuantError(f"LoRA rank does not fit: {name}: lora_A has rank {r}, lora_B "
                                     f"{tuple(up.shape)} (expected {want_up})")
            raise AccuQuantError(f"LoRA for another model: {name} is {kind} {n_in} -> {n_out} in this {cls}; the "
                                 f"LoRA's factors are {tuple(down.shape)} and {tuple(up.shape)}")
        if adapter_name in getattr(target, "lora_adapters", {}):
            raise AccuQuantError(f"LoRA adapter {adapter_name!r} is already loaded (unload it first, or give "
                                 "another adapter name)")
        plan.append((name, target, down, up, scale, kind))
    for name, target, down, up, scale, kind in plan:
        weight = next((t for t in (*target.parameters(), *target.buffers()) if t.is_floating_point()), down)
        conv = None
        if kind == "conv2d":
            m = getattr(target, "module", target)
            conv = dict(stride=m.stride, padding=m.padding, dilation=m.dilation)
        branch = LoraBranch(down.detach().to(weight.device, torch.float32).clone(),
                            up.detach().to(weight.device, torch.float32).clone(), scale, conv)
        branch.strength = float(strength)
        if not hasattr(target, "lora_adapters"):
            target.lora_adapters = nn.ModuleDict()
            target._lora_hook = target.register_forward_hook(_add_branches)
        target.lora_adapters[adapter_name] = branch
    cache.forget(model)
    return [p[0] for p in plan]


def _branches(model: nn.Module, adapter_name: str | None):
    for name, m in model.named_modules():
        for a, b in getattr(m, "lora_adapters", {}).items():
            if adapter_name is None or a == adapter_name:
                yield name, m, a, b


def set_lora_strength(model: nn.Module, strength: float, adapter_name: str | None = None) -> None:
    """Set the strength of adapter ``adapter_name`` (every adapter when ``None``); 0 turns it off."""
    found = False
    for _, m, _, b in _branches(model, adapter_name):
        if b.unfused is not None:
            raise AccuQuantError("unfuse the LoRA before changing its strength")
        b.strength = float(strength)
        found = True
    cache.forget(model)
    if not found:
        raise AccuQuantError(f"no LoRA adapter {adapter_name!r} is loaded" if adapter_name else "no LoRA is loaded")


def unload_lora(model: nn.Module, adapter_name: str | None = None) -> None:
    """Remove adapter ``adapter_name`` (every adapter when ``None``), unfusing it first."""
    unfuse_lora(model, adapter_name)
    for _, m, a, _ in list(_branches(model, adapter_name)):
        del m.lora_adapters[a]
        if not len(m.lora_adapters):
            m._lora_hook.remove()
            del m.lora_adapters, m._lora_hook
    cache.forget(model)


def _float_weight(m: nn.Module) -> nn.Parameter | None:
    """The float weight of a layer kept in full precision (``None`` for a quantized one)."""
    w = getattr(m, "weight", None) if isinstance(m, (nn.Linear, nn.Conv2d)) else None
    return w if isinstance(w, nn.Parameter) else None


@torch.no_grad()
def fuse_lora(model: nn.Module, adapter_name: str | None = None) -> dict[str, list[str]]:
    """Add the adapters' ``B A`` into the float weights of the layers kept in full precision
    (their branch then stops running); quantized layers keep the branch beside them.
    Returns ``{"fused": [...], "beside": [...]}`` (layer names)."""
    done: dict[str, list[str]] = {"fused": [], "beside": []}
    for name, m, _, b in _branches(model, adapter_name):
        w = _float_weight(m)
        if w is None:
            done["beside"].append(name)
            continue
        if b.unfused is None:
            b.unfused = w.detach().clone()
            w.add_(b.delta().to(w.dtype))
        done["fused"].append(name)
    cache.forget(model)
    return done


@torch.no_grad()
def unfuse_lora(model: nn.Module, adapter_name: str | None = None) -> None:
    """Restore the float weights :func:`fuse_lora` changed, exactly (the originals were kept;
    the last fused is restored first)."""
    for _, m, _, b in reversed(list(_branches(model, adapter_name))):
        if b.unfused is not None:
            _float_weight(m).copy_(b.unfused)
            b.unfused = None
    cache.forget(model)


def has_lora(model: nn.Module) -> bool:
    return any(hasattr(m, "lora_adapters") for m in model.modules())


def add_diffusers_methods(pipe, model: nn.Module, prefix: str) -> None:
    """Give a diffusers pipeline object holding ``model`` diffusers' LoRA methods, run by this
    module (diffusers' own go through PEFT, which cannot wrap quantized layers):
    ``load_lora_weights(source, adapter_name=None, strength=1.0)``, ``set_adapters(names,
    adapter_weights)``, ``fuse_lora(lora_scale=1.0)``, ``unfuse_lora()``, ``unload_lora_weights()``."""
    def load_lora_weights(source, adapter_name=None, strength: float = 1.0, **_):
        return load_lora(model, source, adapter_name or "default", strength, prefix)

    def set_adapters(adapter_names, adapter_weights=None):
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
        for n, w in zip(names, weights):
            set_lora_strength(model, 1.0 if w is None else float(w), n)

    def fuse(lora_scale: float = 1.0, adapter_names=None, **_):
        for n in ([adapter_names] if isinstance(adapter_names, str) else adapter_names or [None]):
            if lora_scale != 1.0:
                for _, _, _, b in _branches(model, n):
                    b.strength *= lora_scale
            fuse_lora(model, n)

    for name, fn in (("load_lora_weights", load_lora_weights), ("set_adapters", set_adapters),
                     ("fuse_lora", fuse), ("unfuse_lora", lambda **_: unfuse_lora(model)),
                     ("unload_lora_weights", lambda **_: unload_lora(model))):
        object.__setattr__(pipe, name, fn)
