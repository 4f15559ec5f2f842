#!/usr/bin/env bash
# Train SlotMemory's slot projection φ for a Wan2.1 model from a directory of clips, without labels
# (`slotgen train-slots --videos`), then render a short storyboard with the slot memory and that φ.
#
#   scripts/gpu_slots.sh MODEL CLIPS [OUT]
#
# With a CUDA GPU: MODEL is a diffusers-format Wan2.1 folder (or wan-1.3b-random), CLIPS a directory of
# MP4s (other sizes are resized to the model's, other frame rates resampled, each said in one line;
# CLIP.txt beside a clip is its caption), OUT the φ file (default MODEL/slot_phi.safetensors for a
# folder, which the folder then uses by itself).
# Without CUDA the same command is a smoke test: MODEL is replaced by wan-1.3b-random (30 layers, real
# shapes) at 64x64, with a few steps on a few chunks, and OUT defaults to a temporary file.
#
# Env: PYTHON (default python3), SLOTS_STEPS (default 400; 3 on the CPU), SLOTS_CELLS (grid cells per
#      latent frame, default 256; 16 on the CPU), SLOTS_MAX_CHUNKS (default 2000; 2 on the CPU),
#      SLOTS_BATCH (default 32; 2 on the CPU). Interrupted (Ctrl-C, SIGTERM, closed terminal), the
#      training writes a checkpoint: rerun with SLOTS_RESUME=1 to continue it.
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: scripts/gpu_slots.sh MODEL CLIPS [OUT]" >&2
  exit 2
fi
model="$1"
clips="$2"
out="${3:-}"
py="${PYTHON:-python3}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  device=cuda
  steps="${SLOTS_STEPS:-400}" cells="${SLOTS_CELLS:-256}" chunks="${SLOTS_MAX_CHUNKS:-2000}" batch="${SLOTS_BATCH:-32}"
  size=()
  resolution=""
else
  device=cpu
  echo "gpu_slots: no CUDA device: smoke test on wan-1.3b-random at 64x64 instead of $model" >&2
  model=wan-1.3b-random
  steps="${SLOTS_STEPS:-3}" cells="${SLOTS_CELLS:-16}" chunks="${SLOTS_MAX_CHUNKS:-2}" batch="${SLOTS_BATCH:-2}"
  size=(--width 64 --height 64)
  resolution="resolution: 64x64"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ -z "$out" ]; then
  if [ -d "$model" ]; then out="$model/slot_phi.safetensors"; else out="$work/slot_phi.safetensors"; fi
fi
resume=()
[ "${SLOTS_RESUME:-0}" = 1 ] && resume=(--resume)

"$py" -m slotgen train-slots --model "$model" --videos "$clips" --out "$out" --device "$device" \
  --steps "$steps" --cells "$cells" --max-chunks "$chunks" --batch "$batch" "${size[@]}" "${resume[@]}"

cat > "$work/story.yaml" <<YAML
prompts:
  - {at: 0s, prompt: a red circle moves right on a blue background}
duration: 0.5s
$resolution
memory: {policy: slot}
YAML
"$py" -m slotgen render "$work/story.yaml" --model "$model" --slot-phi "$out" --device "$device" \
  -o "$work/story.mp4" --snapshot "$work/story.pt" -q
"$py" -m slotgen inspect "$work/story.pt" | head -4
echo "gpu_slots: φ written to $out"
