#!/usr/bin/env bash
# Error accumulation of the bundled model at W4A8 (naive): per-step and accumulated error
# along 500 paired trajectories (DDIM 20 steps), FID2FP of the predicted x0.
# Writes benchmarks/results/error_w4a8_naive.csv and docs/error_w4a8_naive.png.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
accuquant quantize --method naive --weight-bits 4 --act-bits 8 --steps 20 --calib-samples 64 --seed 0 \
    --out "$out/w4a8" --quiet
accuquant analyze --model "$out/w4a8" --num 500 --out "$out/error_w4a8_naive" --quiet
mkdir -p benchmarks/results docs
cp "$out/error_w4a8_naive.csv" benchmarks/results/
cp "$out/error_w4a8_naive.png" docs/
