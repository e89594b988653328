"""A denoiser together with what sampling needs, loaded from diffusers directories.

:class:`Pipeline` holds the diffusers denoiser (``unet`` or ``transformer``), its
scheduler config, the other components a pipeline has (a VAE for latent models, a text
encoder and tokenizer for text-conditioned ones) and sampling defaults (guidance scale,
classes). The same object is full precision before :func:`accuquant.quantize` and
quantized after it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import ADAPTERS, Conditions, Denoiser, make_denoiser
from .bundled import model_ref, resolve_ref
from .calibration import noise_batches
from .errors import AccuQuantError
from .progress import progress_bar
from .safety import check_finite, check_safetensors
from .sampling import make_solver, run_trajectory

DENOISER_NAMES = ("unet", "transformer")
SAMPLING_FILE = "accuquant_sampling.json"


@dataclass
class SamplingDefaults:
    """Sampling settings that travel with a model (file ``accuquant_sampling.json``).

    Args:
        guidance_scale: default classifier-free guidance scale (1: no guidance).
        num_classes: number of real classes of a class-conditional model.
        null_class: the label of the unconditional branch, if the model was trained with
            label dropout.
    """

    guidance_scale: float = 1.0
    num_classes: int | None = None
    null_class: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingDefaults":
        return cls(**{k: d[k] for k in ("guidance_scale", "num_classes", "null_class") if k in d})


@dataclass
class Pipeline:
    """A diffusers denoiser and what sampling it needs."""

    model: nn.Module
    scheduler_config: dict
    components: dict = field(default_factory=dict)
    denoiser_name: str = "unet"
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    model_index: dict | None = None
    quant: dict | None = None  # set by quantize/load: config, splits, report, method
    source: str | None = None

    # ------------------------------------------------------------ conditioning
    def denoiser(self, guidance_scale: float | None = None) -> Denoiser:
        g = self.defaults.guidance_scale if guidance_scale is None else guidance_scale
        return make_denoiser(self.model, g, self.defaults.null_class)

    @property
    def num_classes(self) -> int | None:
        if self.defaults.num_classes:
            return self.defaults.num_classes
        cfg = self.model.config
        n = getattr(cfg, "num_class_embeds", None) or getattr(cfg, "num_embeds_ada_norm", None)
        if n and self.defaults.null_class is not None and self.defaults.null_class == n - 1:
            return n - 1
        return n

    def conditions(self, num: int, labels=None, prompts: list[str] | None = None, device="cpu") -> Conditions:
        """Conditions for ``num`` samples: given or balanced labels, or encoded prompts."""
        kind = self.denoiser(1.0).conditioning
        if kind == "class":
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
        if kind == "text":
            if not prompts:
                raise AccuQuantError("this model is text-conditioned: pass prompts (--prompt)")
            prompts = [prompts[k % len(prompts)] for k in range(num)]
            return Conditions(embeds=self.encode_prompts(prompts, device), negative_embeds=self.encode_prompts([""] * num, device))
        return Conditions()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device="cpu") -> torch.Tensor:
        tok, enc = self.components.get("tokenizer"), self.components.get("text_encoder")
        if tok is None or enc is None:
            raise AccuQuantError("prompts given, but the pipeline has no tokenizer and text encoder")
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return enc.to(device)(ids.input_ids.to(device))[0].cpu()

    # ------------------------------------------------------------ sampling
    def to(self, device) -> "Pipeline":
        self.model.to(device)
        for c in self.components.values():
            if isinstance(c, nn.Module):
                c.to(device)
        return self

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from final samples (decoded by the VAE for latent models)."""
        vae = self.components.get("vae")
        if vae is not None:
            x = vae.decode(x / vae.config.scaling_factor).sample
        return ((x.float().clamp(-1, 1) + 1) / 2).cpu()

    @torch.no_grad()
    def sample(
        self,
        num: int,
        seed: int = 0,
        steps: int = 20,
        scheduler: str = "ddim",
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
        solver = make_solver(scheduler, self.scheduler_config, steps)
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

    def save(self, out, overwrite: bool = False) -> None:
        """Save a quantized pipeline as a directory (see :mod:`accuquant.export`)."""
        from .export import save_quantized

        save_quantized(self, out, overwrite=overwrite)

    def sampling_settings(self, steps: int | None = None, scheduler: str | None = None) -> tuple[int, str]:
        """Steps and scheduler: as given, else those a quantized model was calibrated for, else 20 DDIM steps."""
        cal = (self.quant or {}).get("calibration", {})
        return steps or cal.get("steps", 20), scheduler or cal.get("solver", "ddim")

    def fingerprint(self) -> str:
        """A hash of the denoiser (class, config, every tensor) and the sampling defaults, for caches."""
        h = hashlib.sha256(type(self.model).__name__.encode())
        h.update(json.dumps(dict(getattr(self.model, "config", {})), sort_keys=True, default=str).encode())
        h.update(json.dumps(dataclasses.asdict(self.defaults), sort_keys=True).encode())
        for name, t in sorted(self.model.state_dict().items()):
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def copy(self) -> "Pipeline":
        """A pipeline with its own copy of the denoiser (other components are shared)."""
        return dataclasses.replace(self, model=copy.deepcopy(self.model), defaults=copy.copy(self.defaults),
                                   quant=copy.deepcopy(self.quant))


# ---------------------------------------------------------------- loading
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _load_component(path: Path, library: str, class_name: str):
    for f in sorted(path.glob("*.safetensors")):
        check_safetensors(f)
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        raise AccuQuantError(f"{path}: needs {library}.{class_name}, which is not installed") from None
    import diffusers

    # Without `accelerate`, diffusers warns at every load unless told not to try.
    kwargs = {"low_cpu_mem_usage": False} if isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin) else {}
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
    except (OSError, json.JSONDecodeError) as e:
        raise AccuQuantError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise AccuQuantError(f"{path}: expected a JSON object")
    return d


def _defaults(root: Path) -> SamplingDefaults:
    f = root / SAMPLING_FILE
    return SamplingDefaults.from_dict(_read_json(f)) if f.is_file() else SamplingDefaults()


def _default_scheduler_config() -> dict:
    import diffusers

    return dict(diffusers.DDIMScheduler().config)


def load_pipeline(path: str | Path, device: str = "cpu") -> Pipeline:
    """Load a pipeline from a diffusers pipeline directory, a model directory, an accuquant
    quantized directory, or a hub id (downloaded by diffusers on machines that can).

    Raises:
        AccuQuantError: the path is not a diffusers model, or a file in it is corrupt.
    """
    root = Path(resolve_ref(str(path)))
    if not root.exists():
        if _HUB_ID.match(str(path)):
            try:
                import diffusers

                root = Path(diffusers.DiffusionPipeline.download(str(path)))
            except Exception as e:
                raise AccuQuantError(f"{path}: not a local directory, and the hub download failed ({type(e).__name__})") from None
        else:
            raise AccuQuantError(f"{path}: no such file or directory")
    if not root.is_dir():
        raise AccuQuantError(f"{path}: not a diffusers model directory")
    from .export import QUANT_FILE, load_quantized

    if (root / QUANT_FILE).is_file():
        return load_quantized(root, device=device)
    if (root / "model_index.json").is_file():
        index = _read_json(root / "model_index.json")
        name = next((n for n in DENOISER_NAMES if n in index), None)
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
                raise AccuQuantError(f"{path}: unsupported denoiser {spec[1]}; supported: {', '.join(sorted(ADAPTERS))}")
            if comp in ("safety_checker", "feature_extractor", "image_encoder"):
                continue
            components[comp] = _load_component(root / comp, spec[0], spec[1])
        model = components.pop(name)
        pipe = Pipeline(model, sched or _default_scheduler_config(), components, name, _defaults(root), index,
                        source=model_ref(root))
    elif (root / "config.json").is_file():
        cfg = _read_json(root / "config.json")
        cls = cfg.get("_class_name")
        if cls not in ADAPTERS:
            raise AccuQuantError(f"{path}: not a supported diffusers model (class {cls!r})")
        model = _load_component(root, "diffusers", cls)
        sched_file = root / "scheduler_config.json"
        sched = dict(_read_json(sched_file)) if sched_file.is_file() else _default_scheduler_config()
        pipe = Pipeline(model, sched, {}, "transformer" if "Transformer" in cls else "unet", _defaults(root),
                        source=model_ref(root))
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
    for name in DENOISER_NAMES:
        model = getattr(source, name, None)
        if isinstance(model, nn.Module):
            comps = {k: v for k, v in getattr(source, "components", {}).items() if k not in (name, "scheduler") and v is not None}
            model = copy.deepcopy(model) if copy_model else model
            return Pipeline(model.eval(), dict(source.scheduler.config), comps, name)
    raise AccuQuantError(f"cannot quantize a {type(source).__name__}: expected a path, a diffusers pipeline or model")
