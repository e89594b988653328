"""accuquant: post-training quantization of diffusion models (naive, per-step, AccuQuant)."""

__version__ = "0.1.0"

from .adapters import Conditions, Denoiser, make_denoiser  # noqa: E402
from .calibration import Trajectories, collect_trajectories  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .engine import quantize  # noqa: E402
from .errors import AccuQuantError, ConfigError  # noqa: E402
from .pipeline import Pipeline, SamplingDefaults, load_pipeline  # noqa: E402
from .sampling import make_solver, run_trajectory  # noqa: E402

load = load_pipeline

__all__ = [
    "AccuQuantError",
    "Conditions",
    "ConfigError",
    "Denoiser",
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
    "run_trajectory",
]
