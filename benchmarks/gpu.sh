#!/usr/bin/env bash
# The GPU benchmark in one prepared command, for a machine with one NVIDIA GPU (under 10 minutes there):
# sets up .venv from the project's own files (scripts/setup.sh: pinned torch, Ray, DeepSpeed...), then
# trains train_gpu.yaml's FaceMAE (ViT-B/8 + IResNet-50 teacher, bf16, ZeRO-2) on synthetic shards for a
# few hundred steps on 1 GPU through Ray Train, and prints images/s, MFU against the GPU's dense bf16
# peak, the data-wait fraction, peak GPU memory and the generation pool's images/s
# (benchmarks/gpu.py; results in benchmarks/results/gpu.json and gpu.md).
#
#   bash benchmarks/gpu.sh                      # 300 steps, micro-batch 128
#   bash benchmarks/gpu.sh --steps 500 --batch 256
#   bash benchmarks/gpu.sh --cpu-smoke          # checks the script on a machine without a GPU
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
exec "${FACEMAE_VENV:-$root/.venv}/bin/python" benchmarks/gpu.py "$@"
