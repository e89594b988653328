"""The denoiser interface every model family implements, and the registry of families.

Samplers and methods only call ``denoiser(x, t, cond)`` and get the model output the
scheduler expects (noise, v or sample prediction), classifier-free guidance included.
Everything that differs between model families lives in an adapter: how the model is
called, how conditions are made and the unconditional branch built, the latent shape
and how latents become images, and what quantization needs to know (reconstruction
block types, layers kept in full precision, attention processors to replace, layers
whose input is a channel concatenation).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import AccuQuantError, ConfigError
from ..quant.layers import WrapReport, wrap_model
from .conditions import Conditions


class Denoiser(nn.Module):
    """Base adapter: ``forward(x, t, cond)`` returns the (guided) model output.

    Args:
        model: the diffusers model; quantization wraps its layers in place.
        guidance_scale: classifier-free guidance scale; 1 disables guidance.
        null_class: class label of the unconditional branch (class-conditional models).
        components: the pipeline's other components (VAE, text encoders, tokenizers).
        num_classes: number of real classes, when the model's files say it.
        max_sequence_length: text tokens of the T5-style encoder (SD3-style pipelines
            without one: zeros in its slot); ``None``: the pipeline's default.
        sample_size: latent height and width (an int, or ``[h, w]``) where the model's
            config has none (FLUX, Wan); ``None``: the config's, else the family's default.
        num_frames: latent frames of a video model; ``None``: the family's default.
    """

    #: the family's name, as ``accuquant models`` lists it (empty: not listed)
    family = ""
    #: ``"image"`` or ``"video"``: what the model's samples decode to
    media = "image"
    #: latent side when neither the model's config nor the pipeline's defaults give one
    default_sample_size: int | None = None
    #: kinds of the layers quantized (``linear``, ``conv2d``, ``conv1d``), for the backends' coverage
    layer_kinds: tuple[str, ...] = ("linear", "conv2d")

    #: the pipeline component that holds the model
    component = "unet"
    #: the diffusers pipeline class written on export when the source had none
    pipeline_class = "DiffusionPipeline"
    #: module classes reconstructed as one block by per-step calibration
    block_types: tuple[str, ...] = ()
    #: full module names (fnmatch patterns) kept in full precision by default
    keep_fp: tuple[str, ...] = ()
    #: full module names (fnmatch patterns) of the temporal path: the layers that see the
    #: timestep (and class) alone, which ``tfmq`` reconstructs on their own
    temporal_layers: tuple[str, ...] = ()
    #: attention processors replaced by the quantized one (others keep their own logic, in FP)
    attention_processors: tuple[str, ...] = ("AttnProcessor", "AttnProcessor2_0", "QuantAttnProcessor")
    #: ``"none"``, ``"class"`` or ``"text"``
    conditioning = "none"
    #: whether the family's diffusers pipeline class can pass the model its conditions
    diffusers_conditioning = True

    def __init__(self, model: nn.Module, guidance_scale: float = 1.0, null_class: int | None = None,
                 components: dict | None = None, num_classes: int | None = None,
                 max_sequence_length: int | None = None, sample_size=None, num_frames: int | None = None):
        super().__init__()
        self.max_sequence_length = max_sequence_length
        self._sample_size = sample_size
        self._num_frames = num_frames
        self.model = model
        self.guidance_scale = float(guidance_scale)
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale: must be a finite number >= 0, not {guidance_scale!r}")
        self.null_class = null_class
        self.components = components or {}
        self._num_classes = num_classes
        #: rows evaluated by the model so far (guided: both branches), and those with autograd on
        self.evaluations = {"forward": 0, "backward": 0}

    # ---------------------------------------------------------------- the model call
    def raw(self, x: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """One unguided evaluation."""
        raise NotImplementedError

    def unconditional(self, cond: Conditions) -> Conditions:
        """The conditions of the unconditional branch, with the entries :meth:`raw` reads."""
        raise AccuQuantError(f"{type(self.model).__name__}: classifier-free guidance needs an unconditional branch")

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    @property
    def model_dtype(self) -> torch.dtype:
        """The floating dtype the model computes in (a half-precision model's inputs are cast to it)."""
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    def forward(self, x: torch.Tensor, t, cond: Conditions | None = None) -> torch.Tensor:
        """The guided model output, in ``x``'s dtype whatever the model's: samplers keep their
        state in float32 while a half-precision model runs in its own dtype."""
        cond = cond if cond is not None else Conditions()
        rows = x.shape[0] * (2 if self.guided else 1)
        self.evaluations["forward"] += rows
        if torch.is_grad_enabled():
            self.evaluations["backward"] += rows
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        dtype = self.model_dtype
        if dtype != x.dtype:
            cond = Conditions({k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()})
            return self._guided(x.to(dtype), t, cond).to(x.dtype)
        return self._guided(x, t, cond)

    def _guided(self, x, t, cond):
        if not self.guided:
            return self.raw(x, t, cond)
        uncond = self.unconditional(cond)
        both = Conditions({k: torch.cat([v, cond[k]]) for k, v in uncond.items()})
        out = self.raw(torch.cat([x, x]), torch.cat([t, t]), both)
        out_u, out_c = out.chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)

    # ---------------------------------------------------------------- conditions
    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    def conditions(self, num: int, labels=None, prompts: list[str] | None = None, device="cpu") -> Conditions:
        """Conditions for ``num`` samples (an unconditional model has none)."""
        return Conditions()

    def check_conditions(self, cond: Conditions, what: str) -> None:
        """Refuse per-sample conditions this model cannot run on."""

    # ---------------------------------------------------------------- latents and images
    @property
    def config(self):
        return self.model.config

    @property
    def latent_size(self) -> tuple[int, int]:
        """Latent height and width: the pipeline's, else the model config's, else the family's."""
        size = self._sample_size or getattr(self.config, "sample_size", None) or self.default_sample_size
        if size is None:
            raise AccuQuantError(f"{type(self.model).__name__}: the latent size is unknown (its config has no "
                                 "sample_size): give sample_size in accuquant_sampling.json")
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample as the solver sees it (``C, H, W``; video ``C, F, H, W``)."""
        return (self.config.in_channels, *self.latent_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of a decoded image (a VAE's output for latent models)."""
        c, h, w = self.sample_shape
        vae = self.components.get("vae")
        if vae is None:
            return (c, h, w)
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        return (vae.config.out_channels, h * f, w * f)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from final samples (decoded by the VAE for latent models)."""
        vae = self.components.get("vae")
        if vae is not None:
            shift = getattr(vae.config, "shift_factor", None) or 0.0  # latents of SD3-style VAEs are shifted
            x = vae.decode((x / vae.config.scaling_factor + shift).to(vae.dtype)).sample
        return ((x.float().clamp(-1, 1) + 1) / 2).cpu()

    # ---------------------------------------------------------------- the registry's summary
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter handles ``model`` (several families share a diffusers class:
        SD and SDXL's ``UNet2DConditionModel``)."""
        return True

    #: the sampler a pipeline of the family gets by default
    default_solver = "ddim"

    @classmethod
    def describe(cls) -> dict:
        """What ``accuquant models`` prints of the family: its classes, sampler, what stays in
        FP, the attention processors quantized, and whether the integer backends run every
        quantized layer kind."""
        from ..backends.int8 import INTEGER_KINDS

        integer = all(k in INTEGER_KINDS for k in cls.layer_kinds)
        return {"family": cls.family, "pipeline": cls.pipeline_class, "denoiser": ", ".join(cls.model_classes),
                "conditioning": cls.conditioning if isinstance(cls.conditioning, str) else "none or class",
                "media": cls.media, "sampler": cls.default_solver, "keep_fp": list(cls.keep_fp),
                "attention": [p for p in cls.attention_processors if not p.startswith("Quant")],
                "int8": integer, "cuda-int8": integer}

    # ---------------------------------------------------------------- sampling
    def solver_options(self, solver: str, scheduler_config: dict, steps: int) -> dict:
        """The family's arguments of solver ``solver`` with ``steps`` steps beyond the scheduler
        config (a flow model whose sigmas shift with the image size: its ``mu``; FLUX's own
        sigma spacing)."""
        return {}

    # ---------------------------------------------------------------- quantization
    def shortcut_splits(self) -> dict[str, int]:
        """Layers whose input is a channel concatenation, by name, and the channel where it splits."""
        return {}

    def resolve(self, config: QuantConfig) -> QuantConfig:
        """``config`` with the family's layers kept in FP written out where it gives none (so
        that a saved config says them)."""
        return config if config.keep_fp is not None else dataclasses.replace(config, keep_fp=self.keep_fp)

    def wrap(self, config: QuantConfig) -> WrapReport:
        """Wrap the model's layers and the family's attention processors for calibration."""
        return wrap_model(self.model, self.resolve(config), self.shortcut_splits(),
                          processors=self.attention_processors)


#: diffusers model class name -> the adapters of that class, the most specific first
ADAPTERS: dict[str, list[type[Denoiser]]] = {}


def register_adapter(*class_names: str):
    """Class decorator: an adapter of the diffusers model classes ``class_names``. Adapters
    registered later for a class are tried first (a specialisation such as SDXL's is
    registered after the general SD one), each asked :meth:`Denoiser.matches`."""

    def deco(cls):
        cls.model_classes = tuple(class_names)
        for name in class_names:
            ADAPTERS.setdefault(name, []).insert(0, cls)
        return cls

    return deco


def families() -> list[type[Denoiser]]:
    """The registered adapters that name a family, in registration order."""
    seen = dict.fromkeys(cls for classes in ADAPTERS.values() for cls in reversed(classes) if cls.family)
    return list(seen)


def denoiser_names() -> tuple[str, ...]:
    """The pipeline components that can hold a denoiser, as the registered families name them."""
    return tuple(dict.fromkeys(cls.component for classes in ADAPTERS.values() for cls in reversed(classes)))


def unsupported(model_class: str) -> AccuQuantError:
    """The one-line refusal of a denoiser class no adapter handles, naming the families."""
    names = ", ".join(f"{c.family} ({'/'.join(c.model_classes)})" for c in families())
    return AccuQuantError(f"unsupported denoiser {model_class}; supported families: {names}")


def adapter_class(model) -> type[Denoiser]:
    """The adapter of ``model`` (a module, or a diffusers class name: its first adapter)."""
    name = model if isinstance(model, str) else type(model).__name__
    if name not in ADAPTERS:
        raise unsupported(name)
    if isinstance(model, str):
        return ADAPTERS[name][-1]
    for cls in ADAPTERS[name]:
        if cls.matches(model):
            return cls
    raise unsupported(name)


def make_denoiser(model: nn.Module, guidance_scale: float = 1.0, null_class: int | None = None,
                  components: dict | None = None, num_classes: int | None = None,
                  max_sequence_length: int | None = None, sample_size=None, num_frames: int | None = None) -> Denoiser:
    """Wrap a diffusers denoiser in its family's adapter."""
    return adapter_class(model)(model, guidance_scale, null_class, components, num_classes,
                                max_sequence_length=max_sequence_length, sample_size=sample_size,
                                num_frames=num_frames)


class ClassConditional(Denoiser):
    """Class-conditional families: labels ``cond["labels"]``, balanced by default; the
    unconditional branch is the null class (label dropout in training)."""

    conditioning = "class"

    def conditions(self, num, labels=None, prompts=None, device="cpu"):
        n = self.num_classes
        if labels is None:
            if not n:
                raise AccuQuantError("class-conditional model: the number of classes is unknown")
            labels = torch.arange(num) % n
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if len(labels) == 1:
            labels = labels.expand(num)
        if len(labels) != num:
            raise AccuQuantError(f"labels: {len(labels)} labels for {num} samples")
        if n and (labels.min() < 0 or labels.max() >= n):
            raise AccuQuantError(f"labels: class labels must be in 0..{n - 1}")
        return Conditions(labels=labels.clone())

    def check_conditions(self, cond, what):
        if "labels" not in cond:
            raise AccuQuantError(f"{what}: this model is class-conditional, but the data has no labels")

    def unconditional(self, cond):
        if self.null_class is None or "labels" not in cond:
            return super().unconditional(cond)
        return Conditions(labels=torch.full_like(cond["labels"], self.null_class))

    def _label_count(self, n: int | None) -> int | None:
        """The real classes of a label embedding with ``n`` rows: one fewer when the last is the null class."""
        if self._num_classes:
            return self._num_classes
        if n and self.null_class is not None and self.null_class == n - 1:
            return n - 1
        return n


class TextConditional(Denoiser):
    """Text-conditioned families: prompts are encoded by the family (:meth:`encode`, its
    text encoders, which stay in full precision) into the entries of
    :attr:`condition_keys`, each with a ``negative_`` twin (the empty prompt) that forms
    the unconditional branch of classifier-free guidance."""

    conditioning = "text"
    #: the condition entries :meth:`raw` reads (SD3: the sequence and the pooled embedding)
    condition_keys: tuple[str, ...] = ("embeds",)

    def conditions(self, num, labels=None, prompts=None, device="cpu"):
        if not prompts:
            raise AccuQuantError("this model is text-conditioned and has no default prompts: pass prompts")
        return self.encode([prompts[k % len(prompts)] for k in range(num)], device)

    def encode(self, prompts: list[str], device="cpu") -> Conditions:
        """The conditions of ``prompts`` and their ``negative_`` twins, in float32 on the CPU."""
        raise NotImplementedError

    def check_conditions(self, cond, what):
        missing = [k for k in self.condition_keys if k not in cond]
        if missing:
            raise AccuQuantError(f"{what}: this model is text-conditioned, but the data has no {', '.join(missing)}")

    def text_components(self, *names: str) -> list:
        """The pipeline components ``names`` (text encoders and tokenizers); a missing one is
        refused in one line naming it."""
        missing = [k for k in names if self.components.get(k) is None]
        if missing:
            raise AccuQuantError(f"the pipeline has no {', '.join(missing)}: this {self.family or type(self.model).__name__}"
                                 f" model encodes its prompts with {'it' if len(missing) == 1 else 'them'}")
        return [self.components[k] for k in names]

    def require(self, cond: Conditions) -> None:
        """Refuse a call without this family's prompt embeddings."""
        if any(k not in cond for k in self.condition_keys):
            raise AccuQuantError(f"this model is text-conditioned: it needs {' and '.join(self.condition_keys)}")

    def unconditional(self, cond):
        if any(f"negative_{k}" not in cond for k in self.condition_keys):
            return super().unconditional(cond)
        return Conditions({k: cond[f"negative_{k}"] for k in self.condition_keys})
