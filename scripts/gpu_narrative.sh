#!/usr/bin/env bash
# The SlotMemory paper's 60-second interactive comparison on real weights, one CUDA GPU:
# sink@longlive (LongLive as released), bank@memflow (MemFlow as released), slot@longlive and
# slot@memflow (SlotMemory on each), the same seeds for all four, scored by `slotgen bench narrative`
# (CLIP per prompt segment and per 10 s window, VBench subject and background consistency, bootstrap
# intervals over seeds).
#
#   scripts/gpu_narrative.sh [PROMPTS] [SEEDS] [OUT]
#
# PROMPTS: a LongLive-style JSONL (switches at latent frames 40,80,120,160,200 of 240: 60 s at 16 fps)
#          or a storyboard; default storyboards/narrative_60s.jsonl.
# SEEDS:   default 0-4.   OUT: default narrative-gpu/ (finished videos are reused when rerun).
# Needs `slotgen pull longlive` and `slotgen pull memflow` done; the CLIP and DINO scorers come from the
# Hugging Face cache (downloaded on first use) or SCORER_DIR. Env: PYTHON (default python3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
prompts="${1:-storyboards/narrative_60s.jsonl}"
seeds="${2:-0-4}"
out="${3:-narrative-gpu}"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_narrative: nvidia-smi not found; this comparison needs an NVIDIA GPU" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c 'import torch, diffusers, transformers, slotgen; print("torch", torch.__version__, "cuda", torch.version.cuda, "| diffusers", diffusers.__version__, "| transformers", transformers.__version__)'

for name in longlive memflow; do
  if ! "$py" -c "import sys; from slotgen.models.pull import pulled_folder; sys.exit(pulled_folder('$name') is None)"; then
    echo "gpu_narrative: '$name' is not pulled; run: slotgen pull $name" >&2
    exit 2
  fi
done

scorer=()
[ -n "${SCORER_DIR:-}" ] && scorer=(--scorer-dir "$SCORER_DIR")
"$py" -m slotgen bench narrative "$prompts" \
  --policies sink@longlive,bank@memflow,slot@longlive,slot@memflow \
  --models longlive,memflow,longlive,memflow \
  --seeds "$seeds" --device cuda --out "$out" "${scorer[@]}"
