#!/usr/bin/env bash
# Train the miniature on one CUDA GPU, then score it: the prepared device run for issue 5.
#
#   scripts/gpu_train.sh [OUT_DIR] [MINUTES]     (defaults: $OUT/mini or out/mini, 6 minutes)
#
# Why a GPU: on the 2 CPU cores of a dev machine the transformer learns far too slowly (docs/MINIATURE.md,
# session 4: after 2350 steps it still draws no entity free-running). One GPU gives the same recipe
# ~100x the samples in the same wall clock. Batches and every random draw stay on the CPU (seeded), so
# the data a run sees is the CPU run's; only the arithmetic moves (--device cuda, TF32).
#
# Steps: (1) a 5+5-step smoke run, so a device bug costs seconds, not the budget; (2) the run itself,
# larger batches, more episodes; (3) `slotgen bench identity` on the result (2 episodes per gap, CPU
# renders) as a first look. Everything lands in OUT_DIR (6 files) plus OUT_DIR/../identity.json.
#
# The device image has torch but not diffusers: put its wheel in .whl/ first (on the dev machine,
# network allowed):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
# and carry .whl. Env: PYTHON (default python3), GPU_TRAIN_DIT_BATCH (64), GPU_TRAIN_VAE_BATCH (96),
# GPU_TRAIN_EPISODES (256), GPU_TRAIN_THREADS (8, CPU threads for data and batches), GPU_TRAIN_DEVICE (cuda; "cpu" only to check this script's plumbing).
set -euo pipefail

out="${1:-${OUT:+$OUT/mini}}"
out="${out:-out/mini}"
minutes="${2:-6}"
threads="${GPU_TRAIN_THREADS:-8}"
py="${PYTHON:-python3}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"

device="${GPU_TRAIN_DEVICE:-cuda}"
[ "$device" = cpu ] || "$py" - <<'PY'
import sys

import diffusers
import torch
import transformers

if not torch.cuda.is_available():
    sys.exit("gpu_train: torch sees no CUDA device (torch %s, built for CUDA %s)" % (torch.__version__, torch.version.cuda))
print(f"== torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, GPU {torch.cuda.get_device_name()}")
PY

sizes=(--dit-batch "${GPU_TRAIN_DIT_BATCH:-64}" --vae-batch "${GPU_TRAIN_VAE_BATCH:-96}")
echo "== smoke: 5 VAE + 5 transformer steps on $device"
"$py" -m slotgen train-miniature --out /tmp/gpu_train_smoke --device "$device" --steps-vae 5 --steps-dit 5 \
  --episodes 8 "${sizes[@]}" --threads "$threads" -q

echo "== train: $minutes minutes on $device -> $out"
"$py" -m slotgen train-miniature --out "$out" --device "$device" --minutes "$minutes" \
  --episodes "${GPU_TRAIN_EPISODES:-256}" "${sizes[@]}" --threads "$threads"

echo "== bench identity (first look: 2 episodes per gap, CPU renders)"
"$py" -m slotgen bench identity --model "$out" --episodes 2 --gaps 12,36 --no-purity \
  --json "$(dirname "$out")/identity.json"
