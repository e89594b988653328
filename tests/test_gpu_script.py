"""``benchmarks/gpu.sh --dry-run``: the GPU benchmark's every path that runs on a CPU, on tiny
models, so the script is ready when a GPU is at hand."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_benchmark_runs_dry_on_the_cpu(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path),
           "ACCUQUANT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(tmp_path / "gpu")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for model in ("sd15", "flux"):
        for label in ("fp32", "bf16", "accuquant W8A8 cuda-int8", "step M=8"):
            line = next(ln for ln in out.splitlines() if ln.startswith(f"{model} {label}: "))
            assert "median_ms" in line or "peak_mb" in line, line
    assert not (tmp_path / "gpu.json").exists()  # a dry run writes nothing
    assert "| sd15 | bf16 |" in out and "| flux | 8 |" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the benchmark would run")
def test_without_a_gpu_the_benchmark_says_so_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--out", str(tmp_path / "gpu")],
                          capture_output=True, text=True, cwd=ROOT / "benchmarks")
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "gpu.json").exists()
