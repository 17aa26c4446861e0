#!/usr/bin/env bash
# MLX's start-up on the GPU, compiled against eager (issue 16, part 3): four fresh processes,
# two kernel-cache folders. Each compile mode starts once on an empty folder (cold: every
# kernel built by NVRTC) and once on what that run left (warm: a worker's next trial).
#
#   export PYTHONPATH=/path/to/mlx-and-mlx-cuda-13   # ../shared/GPU.md
#   OUT=/some/folder bash benchmarks/gpu/startup.sh   # the device tool sets $OUT
set -u
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${OUT:-/tmp/diffnas-startup}"
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset MLX_PTX_CACHE_DIR
PY="${PYTHON:-python3}"
STEADY="${STEADY_STEPS:-20}"
probe() {  # probe NAME CAP CACHE ARGS...
  local name=$1 cap=$2 cache=$3; shift 3
  echo "[startup.sh $(date +%T)] $name (limit ${cap}s)" >&2
  DIFFNAS_KERNEL_CACHE="$cache" timeout -k 5 "$cap" $PY benchmarks/gpu/compile_probe.py \
      --config demo --batch 32 --steady-steps "$STEADY" --label "$name" "$@" \
      >"$OUT/$name.out" 2>>"$OUT/startup.log"
  echo "[startup.sh $(date +%T)] $name: exit $?" >&2
}
EAGER=/tmp/diffnas-kc-eager-$$; COMPILED=/tmp/diffnas-kc-compiled-$$
probe eager_cold "${EAGER_CAP:-150}" "$EAGER" --eager
probe eager_warm 90 "$EAGER" --eager
probe compiled_cold "${COMPILED_CAP:-200}" "$COMPILED"
probe compiled_warm 90 "$COMPILED"
tail -n 1 "$OUT"/*.out
