"""Evaluation of a quantized model against its full-precision base.

Both models sample from the same seeded noises and labels (paired samples). Reported:

* ``fid2fp``: Frechet distance between features of quantized and FP samples, and
  ``fid2fp_interval``, its 95% bootstrap interval (features up to :data:`BOOTSTRAP_MAX_DIM` wide);
* ``fid`` / ``sfid``: against real data (the held-out digits for the bundled domain), on
  pooled and spatial features; ``is``: Inception Score of the quantized samples;
* ``psnr`` / ``ssim``: paired, quantized sample against the FP sample from the same noise;
* ``class_accuracy``: share of samples the feature network classifies as the requested label.

Feature networks are pluggable: the bundled digit classifier for 1x28x28 images, or
Inception-v3 through torch-fidelity when its weights are on the machine.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from .. import bundled
from ..cache import samples_path, settings_key
from ..errors import AccuQuantError
from ..io.load import load_pipeline
from .metrics import fid_bootstrap, fid_from_features, inception_score, mean_psnr, ssim
from ..pipeline import Pipeline
from ..io.files import atomic_path


class FeatureExtractor:
    """Maps images in [0, 1] to ``{"pool", "spatial", "logits"}`` features."""

    name = "base"

    def __call__(self, images: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
        parts = [self.extract(images[k : k + batch_size]) for k in range(0, len(images), batch_size)]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]} if parts else {}

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


#: image shapes the digit features take: MNIST's, and MNIST padded by 2 pixels (the latent
#: models' 32x32, as diffusers' Stable Diffusion pipeline wants sizes divisible by 8)
DIGIT_SHAPES = ((1, 28, 28), (1, 32, 32))


class DigitFeatures(FeatureExtractor):
    """The bundled digit classifier (1 x 28 x 28 images; 32 x 32 ones are center-cropped)."""

    name = "digits"

    def __init__(self, path: str | Path = bundled.CLASSIFIER):
        from .feature_nets import DigitClassifier

        self.net = DigitClassifier.load(path)

    @torch.no_grad()
    def extract(self, images):
        if tuple(images.shape[1:]) not in DIGIT_SHAPES:
            raise AccuQuantError(f"the digit feature network takes 1x28x28 or 1x32x32 images, got "
                                 f"{tuple(images.shape[1:])}")
        if images.shape[-1] == 32:
            images = images[..., 2:30, 2:30]
        return self.net.features(images.float().cpu() * 2 - 1)


class InceptionFeatures(FeatureExtractor):
    """Inception-v3 (torch-fidelity's FID network) for RGB images; needs its weights locally,
    at ``$ACCUQUANT_INCEPTION_WEIGHTS`` (torch-fidelity's ``weights-inception-2015-12-05``)."""

    name = "inception"

    def __init__(self):
        weights = os.environ.get("ACCUQUANT_INCEPTION_WEIGHTS")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise AccuQuantError("Inception features need torch-fidelity (pip install torch-fidelity)") from None
        if not weights or not Path(weights).is_file():
            raise AccuQuantError("Inception-v3 weights are not available: set ACCUQUANT_INCEPTION_WEIGHTS to "
                                 "torch-fidelity's weights-inception-2015-12-05 file")
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased", "64"],
                                               feature_extractor_weights_path=weights).eval()

    @torch.no_grad()
    def extract(self, images):
        x = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        pool, logits, spatial = self.net(x)
        return {"pool": pool, "logits": logits, "spatial": spatial.flatten(1)}


def feature_extractor(kind: str, image_shape: tuple[int, ...]) -> FeatureExtractor:
    """``"digits"``, ``"inception"``, or ``"auto"`` (digits for 1x28x28 and 1x32x32 images, else Inception)."""
    if kind == "auto":
        kind = "digits" if tuple(image_shape) in DIGIT_SHAPES else "inception"
    if kind == "digits":
        return DigitFeatures()
    if kind == "inception":
        return InceptionFeatures()
    raise AccuQuantError(f"unknown feature network {kind!r}; choose digits, inception or auto")


def lpips_distance(a: torch.Tensor, b: torch.Tensor, batch_size: int = 100) -> float:
    """Mean LPIPS (AlexNet) between paired images in [0, 1], through the ``lpips`` package;
    needs that package and its backbone weights on the machine."""
    try:
        import lpips
    except ImportError:
        raise AccuQuantError("LPIPS needs the lpips package (pip install lpips) and its AlexNet weights") from None
    try:
        net = lpips.LPIPS(net="alex", verbose=False).eval()
    except Exception as e:  # the backbone weights are fetched on first use
        raise AccuQuantError(f"LPIPS weights are not available on this machine ({type(e).__name__})") from None
    out = []
    with torch.no_grad():
        for k in range(0, len(a), batch_size):
            x, y = (t[k : k + batch_size].float() * 2 - 1 for t in (a, b))
            if x.shape[1] == 1:
                x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
            out.append(net(x, y).flatten())
    return torch.cat(out).mean().item()


def base_of(model: Pipeline, base: str | Path | Pipeline | None = None) -> Pipeline:
    """The FP base model of ``model``: given, recorded in the quantized directory, or ``model`` itself."""
    if isinstance(base, Pipeline):
        return base
    if base is not None:
        return load_pipeline(base)
    if model.quant is None:
        return model
    ref = model.quant.base_model
    if not ref or not Path(bundled.resolve_ref(ref)).exists():
        raise AccuQuantError(f"the FP base model ({ref}) is not found: pass it as base")
    return load_pipeline(bundled.resolve_ref(ref))


def fp_samples(base: Pipeline, num: int, seed: int, steps: int, scheduler: str, labels=None, batch_size: int = 100,
               device: str = "cpu", progress: bool = True, use_cache: bool = True,
               prompts: list[str] | None = None) -> torch.Tensor:
    """FP samples, cached by (model weights, sampler, seeds, guidance, conditions: labels, or the
    encoded ``prompts`` of a text model, its default prompts when none are given)."""
    from safetensors.torch import load_file, save_file

    cond = base.conditions(num, labels, prompts)
    solver = base.solver(steps, scheduler)
    # a stochastic sampler's noise depends on the batching: part of the key then
    desc = dict(solver.describe(), batch_size=batch_size if solver.stochastic else None)
    key = settings_key(base.fingerprint(), desc, num, seed, base.defaults.guidance_scale, cond)
    path = samples_path(key)
    if use_cache and path.is_file():
        try:
            return load_file(str(path))["samples"]
        except Exception:  # a damaged cache entry is regenerated
            path.unlink(missing_ok=True)
    x = base.sample(num, seed=seed, steps=steps, scheduler=scheduler, labels=labels, prompts=prompts,
                    batch_size=batch_size, device=device, progress=progress)
    if use_cache:
        with atomic_path(path) as tmp:
            save_file({"samples": x.contiguous()}, str(tmp))
    return x


#: the widest features whose FID gets a bootstrap interval (200 eigendecompositions of a
#: 128-wide covariance take seconds; of Inception's 2048-wide, many minutes on a CPU)
BOOTSTRAP_MAX_DIM = 512


def evaluate(
    model: Pipeline,
    base: str | Path | Pipeline | None = None,
    num: int = 1000,
    steps: int | None = None,
    seed: int = 0,
    scheduler: str | None = None,
    features: str = "auto",
    batch_size: int = 50,
    device: str = "cpu",
    progress: bool = True,
    use_cache: bool = True,
    lpips: bool = False,
    prompts: list[str] | None = None,
) -> dict:
    """Paired evaluation of ``model`` against its FP base (see the module docstring); with
    ``lpips=True`` also the mean LPIPS between paired samples. ``prompts``: what a
    text-conditioned model is scored on (cycled over the samples; default: its own default
    prompts, which a model without them lacks); the class accuracy is then not measured, as
    the prompts' digits are unknown.

    Returns a dict of metrics; ``psnr`` is ``inf`` when every pair is identical (the FP
    model evaluated against itself).
    """
    t0 = time.perf_counter()
    steps, scheduler = model.sampling_settings(steps, scheduler)
    fp = base_of(model, base).to(device)
    extractor = feature_extractor(features, fp.denoiser(1.0).image_shape)  # fail before the long sampling
    x_fp = fp_samples(fp, num, seed, steps, scheduler, batch_size=batch_size, device=device, progress=progress,
                      use_cache=use_cache, prompts=prompts)
    if model is fp:
        x_q = x_fp
    else:
        x_q = model.sample(num, seed=seed, steps=steps, scheduler=scheduler, prompts=prompts, batch_size=batch_size,
                           device=device, progress=progress)
    img_fp, img_q = fp.decode(x_fp.to(device)), model.decode(x_q.to(device))
    t_sample = time.perf_counter() - t0
    f_fp, f_q = extractor(img_fp), extractor(img_q)
    result = {
        "fid2fp": fid_from_features(f_q["pool"], f_fp["pool"]),
        "fid": None,
        "sfid": None,
        "is": inception_score(f_q["logits"], splits=1),
        "psnr": mean_psnr(img_q, img_fp),
        "ssim": ssim(img_q, img_fp).mean().item(),
        "class_accuracy": None,
    }
    if f_q["pool"].shape[1] <= BOOTSTRAP_MAX_DIM and model is not fp:
        lo, hi = fid_bootstrap(f_q["pool"], f_fp["pool"])
        result["fid2fp_interval"] = None if math.isnan(lo) else [lo, hi]
    if lpips:
        result["lpips"] = lpips_distance(img_q, img_fp)
    if extractor.name == "digits":
        real, _ = bundled.heldout()
        f_real = extractor(real)
        result["fid"] = fid_from_features(f_q["pool"], f_real["pool"])
        result["sfid"] = fid_from_features(f_q["spatial"], f_real["spatial"])
        labels = None if prompts else model.class_labels(num)  # given prompts ask for digits nobody named
        if labels is not None:
            result["class_accuracy"] = (f_q["logits"].argmax(1) == labels).float().mean().item()
    q = model.quant
    result.update({
        "num": num,
        "steps": steps,
        "scheduler": scheduler,
        "seed": seed,
        "guidance_scale": model.defaults.guidance_scale,
        "weight_bits": q.config.weight_bits if q else None,
        "act_bits": q.config.act_bits if q else None,
        "method": q.method_name if q else "fp",
        "features": extractor.name,
        "sampling_seconds": round(t_sample, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    })
    if prompts:
        result["prompts"] = list(prompts)
    return result


def quality_summary(model: Pipeline, base: str | Path | Pipeline | None = None, num: int = 300, *, seed: int = 0,
                    prompts: list[str] | None = None, batch_size: int = 50, device: str = "cpu",
                    progress: bool = True, calib=None, calib_options: dict | None = None) -> list[dict]:
    """Paired quality of a quantized ``model`` against its FP base on ``num`` samples (with the
    sampler it was calibrated for, on ``prompts`` for a text model), next to the naive method's
    at the same quantization config calibrated on the same data: ``calib`` (trajectories or
    their file), else collected as the record of ``model``'s calibration says, with
    ``calib_options`` (keywords of :func:`accuquant.quantize`: labels, guidance...) over it.

    Returns :func:`evaluate` results, ``model``'s first; a naive ``model`` is its own
    comparison (one row).
    """
    from ..api import quantize

    if model.quant is None:
        raise AccuQuantError("quality summary: the model is not quantized")
    fp = base_of(model, base).to(device)
    steps, scheduler = model.sampling_settings()
    ev = dict(num=num, steps=steps, seed=seed, scheduler=scheduler, batch_size=batch_size, device=device,
              progress=progress, prompts=prompts)
    rows = [evaluate(model, fp, **ev)]
    if model.quant.method_name != "naive":
        cal = model.quant.calibration
        recorded = {"steps": cal.get("steps"), "scheduler": cal.get("solver"), "calib_samples": cal.get("samples"),
                    "seed": cal.get("seed"), "guidance_scale": cal.get("guidance_scale")}
        opts = {**{k: v for k, v in recorded.items() if v is not None}, "prompts": prompts, "batch_size": batch_size,
                "device": device, **(calib_options or {}), "progress": False}
        naive = quantize(fp, model.quant.config, "naive", calib, **opts)
        rows.append(evaluate(naive, fp, **ev))
    return rows


def format_table(r: dict) -> str:
    """A readable two-column table of an :func:`evaluate` result."""

    def fmt(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return "inf" if math.isinf(v) else f"{v:.4f}"
        return str(v)

    name = (f"{r['method']} W{r['weight_bits'] or 'fp'}A{r['act_bits'] or 'fp'}" if r["method"] != "fp"
            else "full precision")
    rows = [("model", name), ("samples", f"{r['num']} ({r['steps']} {r['scheduler']} steps, "
                                                             f"guidance {r['guidance_scale']})")]
    if r.get("prompts"):
        rows.append(("prompts", "; ".join(r["prompts"])))
    ci = r.get("fid2fp_interval")
    rows += [(k, fmt(r[k]) + (f" (95%: {ci[0]:.4f}..{ci[1]:.4f})" if k == "fid2fp" and ci else ""))
             for k in ("fid2fp", "fid", "sfid", "is", "psnr", "ssim", "lpips", "class_accuracy") if k in r]
    rows.append(("time", f"{r['seconds']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def to_json_safe(r: dict) -> dict:
    """JSON has no infinity or NaN: an infinite PSNR becomes ``null`` with ``"identical": true``,
    a NaN metric (a diverged model) ``null``."""
    out = dict(r)
    if isinstance(out.get("psnr"), float) and math.isinf(out["psnr"]):
        out["psnr"] = None
        out["identical"] = True
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
