#!/usr/bin/env bash
# Set up a virtual environment in .venv and run the main job on the bundled MNIST model:
# quantize it to W4A8 with AccuQuant (the command's defaults), print its quality against FP
# next to the naive method's, and sample a grid from the saved model.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# torch first: a plain `torch` requirement would otherwise pull the newest CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test]"
.venv/bin/accuquant quantize --overwrite      # = --method accuquant --weight-bits 4 --act-bits 8 --out runs/mnist-ddpm-accuquant-w4a8
.venv/bin/accuquant sample --model runs/mnist-ddpm-accuquant-w4a8 --num 100 --nrow 10 --seed 0 \
    --out runs/mnist-w4a8.png --overwrite --quiet
