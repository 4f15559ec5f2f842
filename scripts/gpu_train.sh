#!/usr/bin/env bash
# Train the miniature on one CUDA GPU, then score it: the prepared device run for issue 5.
#
#   scripts/gpu_train.sh [OUT_DIR] [MINUTES]     (defaults: $OUT/mini or out/mini, 5 minutes)
#
# Why a GPU: the 2 CPU cores of a dev machine give the recipe ~3,000 steps of batch 8 in its 55-minute
# budget (docs/MINIATURE.md), about 100 clips per training episode, and it draws none of them; the same
# recipe draws episodes it has seen ~10,000 times in 37-90 % of frames (scripts/memorise_check.py). One
# GPU gives it far more samples in the same wall clock. Batches and every random draw stay on the CPU (seeded), so the data a run sees is the CPU
# run's; only the arithmetic moves (--device cuda, TF32).
#
# Steps: (1) a 5-step smoke run, so a device bug costs seconds, not the budget; (2) the run itself,
# larger batches, more episodes; (3) `slotgen bench identity` on the result (2 episodes per gap, CPU
# renders), scripts/memorise_check.py on 2 of its own training episodes (the recipe's positive control,
# docs/MINIATURE.md "What it can and cannot do"), and a strip of frames of one unseen episode, ground truth over the
# model's (no MP4: the device image lacks imageio-ffmpeg, whose 68 MB wheel cannot travel), as a first
# look. Everything lands in OUT_DIR (6 files) plus OUT_DIR/../identity.json and OUT_DIR/../frames.png
# (8 files: what a device call can bring back).
#
# The device image has torch but not diffusers: put its wheel in .whl/ first (on the dev machine,
# network allowed):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
# and carry .whl. Env: PYTHON (default python3), GPU_TRAIN_BATCH (64),
# GPU_TRAIN_EPISODES (256), GPU_TRAIN_THREADS (8, CPU threads for data and batches), GPU_TRAIN_DEVICE (cuda; "cpu" only to check this script's plumbing).
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
"$py" -m slotgen train-miniature --out /tmp/gpu_train_smoke --device "$device" --steps 5 \
  --episodes 8 "${sizes[@]}" --threads "$threads" -q

echo "== train: $minutes minutes on $device -> $out"
"$py" -m slotgen train-miniature --out "$out" --device "$device" --minutes "$minutes" \
  --episodes "${GPU_TRAIN_EPISODES:-256}" "${sizes[@]}" --threads "$threads"

echo "== bench identity (first look: 2 episodes per gap, CPU renders)"
"$py" -m slotgen bench identity --model "$out" --episodes 2 --gaps 12,36 --no-purity \
  --json "$(dirname "$out")/identity.json"

echo "== memorise check: does it draw 2 of its own training episodes? (Euler 1 and 12 steps, CPU renders)"
"$py" scripts/memorise_check.py --model "$out" --episodes "${GPU_TRAIN_EPISODES:-256}" --score 2 \
  --sampler-steps 1,12 --seeds 7

echo "== frames: ground truth (top) vs the model (bottom), unseen episode 1100, every 12th frame"
"$py" - "$out" "$(dirname "$out")/frames.png" <<'PY'
import sys

import numpy as np
from PIL import Image

from slotgen.bench.identity import FrameCollector, memory_for
from slotgen.models.miniature import load_miniature
from slotgen.render import Renderer
from slotgen.storyboard import parse_storyboard
from slotgen.world import analyse_episode, episode_to_storyboard_yaml, exit_return_episode, render_episode

folder, png = sys.argv[1], sys.argv[2]
ep = exit_return_episode(1100, 12, n_entities=2)
sb = parse_storyboard(episode_to_storyboard_yaml(ep, seed=1, memory=memory_for("slot")), "episode-1100")
col = FrameCollector()
Renderer(sb, bundle=load_miniature(folder)).stream([col])
frames, truth = col.frames(), render_episode(ep).frames
idx = list(range(4, min(len(frames), len(truth)), 12))
strip = np.concatenate([np.concatenate([truth[i] for i in idx], 1), np.concatenate([frames[i] for i in idx], 1)], 0)
Image.fromarray(strip).resize((strip.shape[1] * 2, strip.shape[0] * 2), Image.NEAREST).save(png)
report = analyse_episode(frames, ep).to_dict()
print({k: report[k] for k in ("presence", "compliance", "identity_recall")}, "->", png)
PY
