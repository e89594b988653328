#!/usr/bin/env bash
# Set up a virtual environment in .venv and run the main job: quantize a diffusion model
# to W4A8 with the naive method, save it, and sample a grid from the saved model.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# torch first: a plain `torch` requirement would otherwise pull the newest CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test]"
.venv/bin/python scripts/make_tiny_pipeline.py runs/tiny-pipeline
.venv/bin/accuquant quantize --model runs/tiny-pipeline --method naive --weight-bits 4 --act-bits 8 \
    --steps 20 --scheduler ddim --calib-samples 64 --seed 0 --out runs/tiny-w4a8 --overwrite
.venv/bin/accuquant sample --model runs/tiny-w4a8 --num 16 --seed 0 --out runs/tiny-w4a8.png --overwrite
