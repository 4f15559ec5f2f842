#!/usr/bin/env bash
# GPU speed check: every memory policy on the random-weight Wan2.1-T2V-1.3B (real architecture, real
# Wan2.1 VAE, bf16 with diffusers' fp32-kept modules) at 832x480, one CUDA GPU.
#
#   scripts/gpu_check.sh [CHUNKS]        CHUNKS chunks per policy (default 6; or env CHUNKS)
#
# Env: PYTHON (default python3), GPU_CHECK_JSON (where the rows go as JSON; default a temp file),
#      GPU_CHECK_TIMEOUT (seconds for the whole bench, default 290).
# Installs the project with `pip install -e .` when `slotgen` is missing (falling back to --no-deps
# on machines without network, where the dependencies must already be installed). Prints the GPU,
# the versions, then the timing table last. Exit status: the bench's (124 = timed out).
set -euo pipefail

chunks="${1:-${CHUNKS:-6}}"
case "$chunks" in
  '' | *[!0-9]* | 0) echo "gpu_check: CHUNKS must be a positive integer, got '$chunks'" >&2; exit 2 ;;
esac
limit="${GPU_CHECK_TIMEOUT:-290}"
py="${PYTHON:-python3}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: nvidia-smi not found; this check needs an NVIDIA GPU" >&2
  exit 1
fi
smi="$(nvidia-smi)"
printf '%s\n' "$smi" | sed -n '1,12p'

if ! command -v slotgen >/dev/null 2>&1; then
  echo "== slotgen is not installed: pip install -e ."
  "$py" -m pip install -q -e . || "$py" -m pip install -q --no-deps --no-build-isolation -e .
fi
if command -v slotgen >/dev/null 2>&1; then
  slotgen_cmd=(slotgen)
else
  slotgen_cmd=("$py" -m slotgen)  # the package imports even where the console script is not on PATH
fi

"$py" - <<'PY'
import sys

import diffusers
import torch
import transformers

if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device (torch %s, built for CUDA %s)" % (torch.__version__, torch.version.cuda))
print(f"== torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, GPU {torch.cuda.get_device_name()}")
PY

json_out="${GPU_CHECK_JSON:-$(mktemp -t gpu_check.XXXXXX.json)}"
log="$(mktemp -t gpu_check.XXXXXX.log)"
trap 'rm -f "$log"' EXIT
echo "== slotgen bench speed: wan-1.3b-random, cuda, 832x480, policies window,sink,bank,slot, $chunks chunks each (limit ${limit}s)"

rc=0
timeout "$limit" "${slotgen_cmd[@]}" bench speed --model wan-1.3b-random --device cuda --resolution 832x480 \
  --policies window,sink,bank,slot --chunks "$chunks" --json "$json_out" >"$log" 2>&1 || rc=$?
if [ "$rc" -ne 0 ]; then
  if [ "$rc" -eq 124 ]; then
    echo "== bench timed out after ${limit}s (try fewer chunks); its last output:"
  else
    echo "== bench failed (exit $rc); its last output:"
  fi
  tail -n 60 "$log"
  exit "$rc"
fi
echo "== rows as JSON: $json_out"
cat "$log"
