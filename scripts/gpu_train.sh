#!/usr/bin/env bash
# Train the miniature on one CUDA GPU, then score it.
#
#   scripts/gpu_train.sh [OUT_DIR] [MINUTES]     (defaults: $OUT/mini or out/mini, 5 minutes)
#
# Why a GPU: 2 CPU cores give the recipe ~3,000 steps of batch 8 in a 55-minute run (docs/MINIATURE.md),
# about 100 clips per training episode, and it draws none of them; the same recipe draws episodes it has
# seen ~10,000 times in 37-90 % of frames (scripts/memorise_check.py). One GPU gives it far more samples
# in the same wall clock. Batches and every random draw stay on the CPU (seeded), so the data a run sees
# is the CPU run's; only the arithmetic moves (--device cuda, TF32).
#
# Steps: (1) a 5-step smoke run, so a device bug costs seconds, not the run; (2) the run itself, larger
# batches, more episodes; (3) `slotgen bench identity` on the result (2 episodes per gap, CPU renders),
# scripts/memorise_check.py on 2 of its own training episodes (the recipe's positive control,
# docs/MINIATURE.md), and a strip of frames of one unseen episode, ground truth over the model's, as a
# first look (a PNG: nothing here writes an MP4, so imageio-ffmpeg is not needed). Everything lands in
# OUT_DIR (6 files; no checkpoint) plus OUT_DIR/../identity.json, OUT_DIR/../held_out.json and
# OUT_DIR/../frames.png: 9 files in all.
#
# Packages the GPU machine lacks (e.g. diffusers) can come as wheels in .whl/, installed into /tmp/site
# without network; download them where the network is allowed:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
# Env: PYTHON (default python3), GPU_TRAIN_BATCH (64), GPU_TRAIN_EPISODES (256), GPU_TRAIN_WORLD
# (standard; "reduced": docs/WORLD.md), GPU_TRAIN_THREADS (8, CPU threads for data and batches),
# GPU_TRAIN_DEVICE (cuda; "cpu" only to check this script's plumbing).
set -euo pipefail

out="${1:-${OUT:+$OUT/mini}}"
out="${out:-out/mini}"
minutes="${2:-5}"
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

sizes=(--batch "${GPU_TRAIN_BATCH:-64}")
echo "== smoke: 5 transformer steps on $device"
"$py" -m slotgen train-miniature --out /tmp/gpu_train_smoke --device "$device" --steps 5 --checkpoint-every 0 \
  --episodes 8 "${sizes[@]}" --threads "$threads" -q

echo "== train: $minutes minutes on $device -> $out"
"$py" -m slotgen train-miniature --out "$out" --device "$device" --minutes "$minutes" \
  --world "${GPU_TRAIN_WORLD:-standard}" --checkpoint-every 0 --episodes "${GPU_TRAIN_EPISODES:-256}" "${sizes[@]}" --threads "$threads"

echo "== bench identity (first look: 2 episodes per gap, CPU renders)"
"$py" -m slotgen bench identity --model "$out" --episodes 2 --gaps 12,36 --no-purity \
  --json "$(dirname "$out")/identity.json"

echo "== memorise check: does it draw 2 of its own training episodes? (Euler 1 and 12 steps, CPU renders)"
"$py" scripts/memorise_check.py --model "$out" --episodes "${GPU_TRAIN_EPISODES:-256}" --score 2 \
  --sampler-steps 1,12 --seeds 7

echo "== held-out presence: 12 unseen episodes of the model's world, free-running (window, Euler 12)"
"$py" scripts/memorise_check.py --model "$out" --held-out 12 --sampler-steps 12 --seeds 7 \
  --json "$(dirname "$out")/held_out.json"

echo "== frames: ground truth (top) vs the model (bottom), an unseen two-entity episode of the model's world"
"$py" scripts/frame_strip.py --model "$out" --out "$(dirname "$out")/frames.png" --episode-seed 1100 --gap 12 \
  --entities 2 --policy slot --every 12
