#!/usr/bin/env bash
# Set up a virtual environment in .venv and run the main job on the bundled MNIST model:
# quantize it to W4A8 with the naive method, evaluate it against the FP model, sample a grid.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# torch first: a plain `torch` requirement would otherwise pull the newest CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test]"
.venv/bin/accuquant quantize --method naive --weight-bits 4 --act-bits 8 --steps 20 --scheduler ddim \
    --calib-samples 64 --seed 0 --out runs/mnist-w4a8 --overwrite
.venv/bin/accuquant evaluate --model runs/mnist-w4a8 --num 500
.venv/bin/accuquant sample --model runs/mnist-w4a8 --num 100 --nrow 10 --seed 0 --out runs/mnist-w4a8.png --overwrite
