"""accuquant: post-training quantization of diffusion models (naive, per-step, AccuQuant)."""

from .version import __version__  # noqa: E402

from .models import Conditions, Denoiser, make_denoiser  # noqa: E402
from .backends import LayerSpec, register_backend  # noqa: E402
from .calibrate.data import Trajectories, collect_trajectories  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .api import quantize  # noqa: E402
from .errors import AccuQuantError, ConfigError, DivergenceError  # noqa: E402
from .io.load import load_pipeline  # noqa: E402
from .pipeline import Pipeline, SamplingDefaults  # noqa: E402
from .sampling import make_solver, run_trajectory  # noqa: E402
from .io.torchao import save_torchao  # noqa: E402

load = load_pipeline

__all__ = [
    "AccuQuantError",
    "Conditions",
    "ConfigError",
    "DivergenceError",
    "Denoiser",
    "LayerSpec",
    "Pipeline",
    "QuantConfig",
    "SamplingDefaults",
    "Trajectories",
    "collect_trajectories",
    "load",
    "load_pipeline",
    "make_denoiser",
    "make_solver",
    "quantize",
    "register_backend",
    "run_trajectory",
    "save_torchao",
]
