#!/usr/bin/env bash
# GPU speed check: every memory policy on the random-weight Wan2.1-T2V-1.3B (real architecture, real
# Wan2.1 VAE, bf16 with diffusers' fp32-kept modules) at 832x480, one CUDA GPU: FPS and peak VRAM per
# policy (bench speed), then host syncs and operator launches per chunk (bench syncs).
#
#   scripts/gpu_check.sh [CHUNKS]        CHUNKS chunks per policy (default 6; or env CHUNKS)
#
# Env: PYTHON (default python3), GPU_CHECK_JSON (where the rows go as JSON; default a temp file),
#      GPU_CHECK_TIMEOUT (seconds for the whole bench, default 290).
#      GPU_CHECK_DEVICE (default cuda): cpu runs the same steps without a GPU, on GPU_CHECK_MODEL
#      (default miniature on cpu) at GPU_CHECK_RESOLUTION (default the model's), to check the script.
# Installs the project with `pip install -e .` when `slotgen` is neither on PATH nor importable (falling back to --no-deps
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

device="${GPU_CHECK_DEVICE:-cuda}"
if [ "$device" = cpu ]; then
  model="${GPU_CHECK_MODEL:-miniature}"
  res_args=()
  [ -n "${GPU_CHECK_RESOLUTION:-}" ] && res_args=(--resolution "$GPU_CHECK_RESOLUTION")
else
  model="${GPU_CHECK_MODEL:-wan-1.3b-random}"
  res_args=(--resolution "${GPU_CHECK_RESOLUTION:-832x480}")
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi not found; this check needs an NVIDIA GPU (GPU_CHECK_DEVICE=cpu checks the script)" >&2
    exit 1
  fi
  smi="$(nvidia-smi)"
  printf '%s\n' "$smi" | sed -n '1,12p'
fi

if ! command -v slotgen >/dev/null 2>&1 && ! "$py" -c "import slotgen" >/dev/null 2>&1; then
  echo "== slotgen is not installed: pip install -e ."
  "$py" -m pip install -q -e . || "$py" -m pip install -q --no-deps --no-build-isolation -e .
fi
if command -v slotgen >/dev/null 2>&1; then
  slotgen_cmd=(slotgen)
else
  slotgen_cmd=("$py" -m slotgen)  # the package imports even where the console script is not on PATH
fi

GPU_CHECK_DEVICE="$device" "$py" - <<'PY'
import os
import sys

import diffusers
import torch
import transformers

if os.environ["GPU_CHECK_DEVICE"] != "cpu" and not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device (torch %s, built for CUDA %s)" % (torch.__version__, torch.version.cuda))
print(f"== torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, "
      + (f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"))
PY

json_out="${GPU_CHECK_JSON:-$(mktemp -t gpu_check.XXXXXX.json)}"
log="$(mktemp -t gpu_check.XXXXXX.log)"
trap 'rm -f "$log"' EXIT
echo "== slotgen bench speed: $model, $device, ${res_args[*]:-default size}, policies window,sink,bank,slot, $chunks chunks each (limit ${limit}s)"

run_step() {  # run_step NAME ARGS...: the bench under the time limit; its table, or its last output on failure
  local name="$1" rc=0
  shift
  timeout "$limit" "${slotgen_cmd[@]}" bench "$name" "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    if [ "$rc" -eq 124 ]; then
      echo "== bench $name timed out after ${limit}s (try fewer chunks); its last output:"
    else
      echo "== bench $name failed (exit $rc); its last output:"
    fi
    tail -n 60 "$log"
    exit "$rc"
  fi
  cat "$log"
}

run_step speed --model "$model" --device "$device" "${res_args[@]}" --policies window,sink,bank,slot \
  --chunks "$chunks" --json "$json_out"
echo "== rows as JSON: $json_out"
echo "== slotgen bench syncs: host syncs and operator launches per chunk ($device)"
run_step syncs --model "$model" --device "$device" "${res_args[@]}" --chunks "$(( chunks < 3 ? 3 : chunks ))" \
  --json "${json_out%.json}.syncs.json"
