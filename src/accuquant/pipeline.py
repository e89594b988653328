"""A denoiser together with what sampling needs (loaded by :mod:`accuquant.loading`).

:class:`Pipeline` holds the diffusers denoiser (``unet`` or ``transformer``), its
scheduler config, the other components a pipeline has (a VAE for latent models, a text
encoder and tokenizer for text-conditioned ones) and sampling defaults (guidance scale,
classes). The same object is full precision before :func:`accuquant.quantize` and
quantized after it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import cache
from .models import Conditions, Denoiser, adapter_class, make_denoiser
from .calibrate.data import noise_batches
from .config import DEFAULT_STEPS, QuantConfig
from .errors import AccuQuantError
from .quant.layers import WrapReport
from .io.save import save_quantized
from .quant.lora import add_diffusers_methods, fuse_lora, load_lora, set_lora_strength, unfuse_lora, unload_lora
from .progress import progress_bar
from .sampling import Solver, default_solver, make_solver, run_trajectory

SAMPLING_FILE = "accuquant_sampling.json"


def check_images(model_class: str, what: str, hint: str = "") -> None:
    """Refuse ``what`` (something that makes or scores images) on a denoiser class whose
    family's samples are videos, in one line; a class no family handles is left to the loader."""
    from .models import ADAPTERS

    if model_class in ADAPTERS and (cls := adapter_class(model_class)).media != "image":
        raise AccuQuantError(f"{what} works on images, and {model_class} ({cls.family}) is a video model{hint}")


@dataclass
class SamplingDefaults:
    """Sampling settings that travel with a model (file ``accuquant_sampling.json``).

    Args:
        guidance_scale: default classifier-free guidance scale (1: no guidance).
        num_classes: number of real classes of a class-conditional model.
        null_class: the label of the unconditional branch, if the model was trained with
            label dropout.
        prompts: default prompts of a text-conditioned model (calibration, evaluation and
            sampling when none are given), cycled over the samples.
        prompt_labels: the class each default prompt asks for (the evaluation's class accuracy).
        max_sequence_length: text tokens of the T5-style encoder (SD3-style pipelines
            without one fill its slot with this many zero tokens; diffusers' default 256 or
            512): a model trained with fewer is sampled with the same (plain diffusers:
            ``pipe(..., max_sequence_length=N)``).
        sample_size: the latent side (an int, or ``[h, w]``) for models whose config has none
            (FLUX, Wan); plain diffusers: ``height`` and ``width`` times the VAE's factor.
        num_frames: latent frames of a video model.
    """

    guidance_scale: float = 1.0
    num_classes: int | None = None
    null_class: int | None = None
    prompts: list[str] | None = None
    prompt_labels: list[int] | None = None
    max_sequence_length: int | None = None
    sample_size: int | list[int] | None = None
    num_frames: int | None = None

    @classmethod
    def from_dict(cls, d: dict, source: str = SAMPLING_FILE) -> "SamplingDefaults":
        """Read from ``d`` (found in ``source``, named in errors)."""
        fields = [f.name for f in dataclasses.fields(cls)]
        out = cls(**{k: d[k] for k in fields if k in d})
        g = out.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise AccuQuantError(f"{source}: 'guidance_scale' must be a finite number >= 0, not {g!r}")
        size = out.sample_size
        if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size > 0) and not (
                isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise AccuQuantError(f"{source}: 'sample_size' must be a positive integer or [height, width], not {size!r}")
        for k in ("num_classes", "null_class", "max_sequence_length", "num_frames"):
            v = getattr(out, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise AccuQuantError(f"{source}: {k!r} must be a non-negative integer or null, not {v!r}")
        if out.prompts is not None and (not isinstance(out.prompts, list)
                                        or not all(isinstance(t, str) for t in out.prompts)):
            raise AccuQuantError(f"{source}: 'prompts' must be a list of strings")
        if out.prompt_labels is not None and (
                not isinstance(out.prompt_labels, list) or not all(isinstance(v, int) for v in out.prompt_labels)
                or len(out.prompt_labels) != len(out.prompts or [])):
            raise AccuQuantError(f"{source}: 'prompt_labels' must be a list of integers, one per prompt")
        return out

    def to_dict(self) -> dict:
        """All fields but the default prompts when there are none (so a model without them
        keeps the cache keys it had before they existed)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None or k not in ("prompts", "prompt_labels", "max_sequence_length", "sample_size",
                                              "num_frames")}


@dataclass
class QuantRecord:
    """What quantization did to a pipeline: saved with the model (``accuquant.json``) and
    read back when it loads, so that loading needs nothing from today's family adapters
    (the layers kept in FP are in ``config.keep_fp``, the quantized attention modules in
    ``report.attention``)."""

    config: QuantConfig
    report: WrapReport
    method: str
    method_version: int | None = None
    method_config: dict = field(default_factory=dict)
    method_options: dict = field(default_factory=dict)
    #: samples, seed, solver, steps and guidance scale of the calibration trajectories
    calibration: dict = field(default_factory=dict)
    method_log: dict = field(default_factory=dict)
    timing_s: dict = field(default_factory=dict)
    accuquant_version: str | None = None
    #: the denoiser's dtype (calibrated in float32, put back in it)
    dtype: str = "float32"
    #: the FP model it came from (a path, or ``bundled:NAME``)
    base_model: str | None = None
    component_dtypes: dict = field(default_factory=dict)
    #: a sampling correction's name, version and statistics (:mod:`accuquant.methods.corrections`)
    correction: dict | None = None

    @property
    def splits(self) -> dict[str, int]:
        return self.report.split

    @property
    def method_name(self) -> str:
        """The method with its sampling correction, if any: ``accuquant+ptqd``."""
        return f"{self.method}+{self.correction['name']}" if self.correction else self.method

    @property
    def label(self) -> str:
        """``naive W4A8``, ``accuquant+ptqd W4A8``"""
        return f"{self.method_name} {self.config.label.upper()}"

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(config=self.config.to_dict(), report=self.report.to_dict(), splits=dict(self.report.split))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantRecord":
        """From a saved ``accuquant.json`` (older ones lack the later fields)."""
        known = {f.name for f in dataclasses.fields(cls)}
        report = WrapReport.from_dict(d.get("report", {}))
        if not report.split and d.get("splits"):
            report.split = {k: int(v) for k, v in d["splits"].items()}
        return cls(**{**{k: v for k, v in d.items() if k in known}, "config": QuantConfig.from_dict(d["config"]),
                      "report": report})


@dataclass
class Pipeline:
    """A diffusers denoiser and what sampling it needs."""

    model: nn.Module
    scheduler_config: dict
    components: dict = field(default_factory=dict)
    denoiser_name: str = "unet"
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    model_index: dict | None = None
    quant: QuantRecord | None = None  # set by quantize and load
    source: str | None = None

    def __post_init__(self):
        if self.defaults.num_frames is not None:  # frames of an image model: a mistake, said at once
            cls = adapter_class(self.model)
            if cls.media != "video":
                raise AccuQuantError(f"num_frames: {type(self.model).__name__} ({cls.family or cls.__name__}) is an "
                                     f"image model; frames are for video models")

    # ------------------------------------------------------------ the family's adapter
    def denoiser(self, guidance_scale: float | None = None) -> Denoiser:
        """The model behind its family's adapter, with this pipeline's components and defaults."""
        g = self.defaults.guidance_scale if guidance_scale is None else guidance_scale
        d = self.defaults
        return make_denoiser(self.model, g, d.null_class, self.components, d.num_classes,
                             max_sequence_length=d.max_sequence_length, sample_size=d.sample_size,
                             num_frames=d.num_frames)

    @property
    def num_classes(self) -> int | None:
        return self.denoiser(1.0).num_classes

    def conditions(self, num: int, labels=None, prompts: list[str] | None = None, device="cpu") -> Conditions:
        """Conditions for ``num`` samples, as the model's family makes them (balanced or given
        labels, encoded prompts (the model's default prompts when none are given), or none)."""
        den = self.denoiser(1.0)
        kind = {"class": "class-conditional: pass labels", "text": "text-conditioned: pass prompts",
                "none": "unconditional: it takes neither labels nor prompts"}
        if prompts and den.conditioning != "text":
            raise AccuQuantError(f"prompts given, but this model is {kind[den.conditioning]}")
        if labels is not None and den.conditioning != "class":
            raise AccuQuantError(f"labels given, but this model is {kind[den.conditioning]}")
        if den.conditioning == "text" and not prompts:
            prompts = self.defaults.prompts
        return den.conditions(num, labels, prompts, device)

    def class_labels(self, num: int) -> torch.Tensor | None:
        """The class each of ``num`` default samples asks for: the balanced labels of a
        class-conditional model, the labels of a text model's default prompts, else ``None``."""
        den = self.denoiser(1.0)
        if den.conditioning == "class":
            return den.conditions(num)["labels"]
        if den.conditioning == "text" and self.defaults.prompts and self.defaults.prompt_labels:
            lab = self.defaults.prompt_labels
            return torch.tensor([lab[k % len(lab)] for k in range(num)])
        return None

    # ------------------------------------------------------------ sampling
    def to(self, device) -> "Pipeline":
        self.model.to(device)
        for c in self.components.values():
            if isinstance(c, nn.Module):
                c.to(device)
        return self

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from final samples, as the model's family decodes them (a video
        model is refused: what scores or shows images would misread its frames; see
        :meth:`decode_video`)."""
        check_images(type(self.model).__name__, "decode", "; decode_video gives its frames")
        return self.denoiser(1.0).decode(x)

    def decode_video(self, x: torch.Tensor) -> torch.Tensor:
        """A video model's frames ``(B, 3, F, H, W)`` in [0, 1] from final samples."""
        den = self.denoiser(1.0)
        if den.media != "video":
            raise AccuQuantError(f"decode_video: {type(self.model).__name__} is an image model; decode gives its images")
        return den.decode(x)

    @torch.no_grad()
    def sample(
        self,
        num: int,
        seed: int = 0,
        steps: int | None = None,
        scheduler: str | None = None,
        labels=None,
        prompts: list[str] | None = None,
        guidance_scale: float | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        progress: bool = True,
        stream: str = "sample",
    ) -> torch.Tensor:
        """Generate ``num`` samples; returns final samples (latents for latent models).

        Sample ``k`` starts from the ``k``-th noise of ``seed``, so two models sampled with
        the same arguments start from the same noises and labels.
        """
        solver = self.solver(steps, scheduler)
        den = self.denoiser(guidance_scale)
        cond = self.conditions(num, labels, prompts, device)
        out = []
        n_batches = math.ceil(num / batch_size)
        gen = torch.Generator().manual_seed(seed)
        with progress_bar(n_batches * solver.num_steps, "sampling", disable=not progress) as bar:
            for _, noise, c in noise_batches(den.sample_shape, cond, num, batch_size, seed, stream, device):
                x = run_trajectory(den, solver, noise, c, generator=gen, callback=lambda i: bar.update(1))
                out.append(x.cpu())
        return torch.cat(out)

    def diffusers_scheduler(self):
        """The diffusers scheduler object of :attr:`scheduler_config` (DDIM if its class is unknown)."""
        import diffusers

        cls = getattr(diffusers, self.scheduler_config.get("_class_name", ""), diffusers.DDIMScheduler)
        return cls.from_config(self.scheduler_config)

    def to_diffusers(self):
        """A diffusers pipeline object of the source's class (``StableDiffusionPipeline``,
        ``DiTPipeline``, ...) holding this pipeline's denoiser, quantized layers included,
        and its other components: ``pipe.to_diffusers()(prompt).images`` runs diffusers' own
        sampling loop on the quantized model. A quantized pipeline gets the scheduler it was
        calibrated for (pass the calibrated step count as ``num_inference_steps``)."""
        import inspect

        import diffusers

        name = (self.model_index or {}).get("_class_name") or adapter_class(self.model).pipeline_class
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise AccuQuantError(f"diffusers has no pipeline class {name}")
        if not self.denoiser(1.0).diffusers_conditioning:
            raise AccuQuantError(f"diffusers' {name} cannot condition this {type(self.model).__name__} (class labels): "
                                 "sample with accuquant (Pipeline.sample)")
        if self.quant:  # the scheduler it was calibrated for (call it with the calibrated step count)
            sched = self.solver().scheduler
            if self.quant.correction:
                import warnings

                warnings.warn(f"the {self.quant.correction['name']} correction acts in accuquant's sampler step "
                              "(Pipeline.sample); diffusers' own loop samples without it", stacklevel=2)
        else:
            sched = self.diffusers_scheduler()
        given = {**self.components, self.denoiser_name: self.model, "scheduler": sched}
        kwargs = {}
        for pname, param in inspect.signature(cls.__init__).parameters.items():
            if pname in given:
                kwargs[pname] = given[pname]
            elif pname == "requires_safety_checker":
                kwargs[pname] = False  # no safety checker is bundled or quantized
            elif param.default is inspect.Parameter.empty and param.kind is param.POSITIONAL_OR_KEYWORD \
                    and pname != "self":
                kwargs[pname] = None  # an optional component this pipeline does not have
        out = cls(**kwargs)
        add_diffusers_methods(out, self.model, self.denoiser_name)  # LoRA on the quantized layers
        return out

    # ------------------------------------------------------------ LoRA (see accuquant.quant.lora)
    def load_lora_weights(self, source, adapter_name: str = "default", strength: float = 1.0) -> list[str]:
        """Attach a diffusers/PEFT-format LoRA (a file, a directory or a state dict) to the
        denoiser, in floating point beside its (quantized) layers; the layers it targets."""
        return load_lora(self.model, source, adapter_name, strength, prefix=self.denoiser_name)

    def set_lora_strength(self, strength: float, adapter_name: str | None = None) -> None:
        set_lora_strength(self.model, strength, adapter_name)

    def fuse_lora(self, adapter_name: str | None = None) -> dict[str, list[str]]:
        return fuse_lora(self.model, adapter_name)

    def unfuse_lora(self, adapter_name: str | None = None) -> None:
        unfuse_lora(self.model, adapter_name)

    def unload_lora_weights(self, adapter_name: str | None = None) -> None:
        unload_lora(self.model, adapter_name)

    def compile(self) -> "Pipeline":
        """Compile the denoiser with ``torch.compile`` for inference, on the backend it is on
        (:mod:`accuquant.backends.compiled`); compiled at the first call, which is slow."""
        from .backends.compiled import compile_model

        compile_model(self.model)
        return self

    def save(self, out, overwrite: bool = False) -> None:
        """Save a quantized pipeline as a directory (see :mod:`accuquant.export`)."""
        save_quantized(self, out, overwrite=overwrite)

    def solver(self, steps: int | None = None, scheduler: str | None = None) -> Solver:
        """The one place a pipeline's solver is built: the steps and sampler of
        :meth:`sampling_settings`, with the arguments the model's family adds (a flow
        model's dynamic shift ``mu``: :meth:`~accuquant.models.Denoiser.solver_options`),
        and a quantized model's sampling correction in its step."""
        steps, name = self.sampling_settings(steps, scheduler)
        solver = make_solver(name, self.scheduler_config, steps,
                             **self.denoiser(1.0).solver_options(name, self.scheduler_config, steps))
        if self.quant is not None and self.quant.correction:  # the correction acts inside the step
            from .methods.corrections import CorrectedSolver, Correction

            solver = CorrectedSolver(solver, Correction.from_dict(self.quant.correction))
        return solver

    def sampling_settings(self, steps: int | None = None, scheduler: str | None = None) -> tuple[int, str]:
        """Steps and scheduler: as given, else those a quantized model was calibrated for, else
        :data:`~accuquant.config.DEFAULT_STEPS` steps of the model's default solver (:func:`~accuquant.sampling.default_solver`)."""
        cal = self.quant.calibration if self.quant else {}
        return steps or cal.get("steps", DEFAULT_STEPS), scheduler or cal.get("solver") or default_solver(self.scheduler_config)

    def fingerprint(self) -> str:
        """A hash of the denoiser (class, config, weights: computed once per model object) and
        the sampling defaults, for caches."""
        return cache.pipeline_key(cache.fingerprint(self.model), self.defaults.to_dict())

    def copy(self) -> "Pipeline":
        """A pipeline with its own copy of the denoiser (other components are shared)."""
        return dataclasses.replace(self, model=copy.deepcopy(self.model), defaults=copy.copy(self.defaults),
                                   quant=copy.deepcopy(self.quant))
