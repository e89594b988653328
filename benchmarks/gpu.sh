#!/bin/bash
# The GPU benchmark (benchmarks/gpu.py) within 8 minutes: results/gpu.{json,md} on a CUDA machine;
# with --dry-run, tiny models on the CPU (checks every path that runs there, writes nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
exec timeout --signal=INT --kill-after=20 470 "$PY" benchmarks/gpu.py "$@"
