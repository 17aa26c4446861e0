#!/usr/bin/env bash
# MLX's start-up and steady train step on the GPU, in fresh processes of compile_probe.py
# (issue 16, part 3). Each pair of probes shares a kernel-cache folder: the first starts on
# an empty one (cold: every kernel built by NVRTC), the second on what it left (warm: a
# worker's next trial).
#
#   compile    (default) eager against compiled (DIFFNAS_COMPILE=off / on), with a DDIM run
#   optimizer  MLX's AdamW in the eager default against the fused per-array update
#              (DIFFNAS_COMPILE=fused, engine/training/fused.py), train step only
#
#   export PYTHONPATH=/path/to/mlx-and-mlx-cuda-13     # ../shared/GPU.md
#   OUT=/some/folder bash benchmarks/gpu/startup.sh [compile|optimizer]   # the device tool sets $OUT
set -u
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${OUT:-/tmp/diffnas-startup}"
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset MLX_PTX_CACHE_DIR
PY="${PYTHON:-python3}"
STEADY="${STEADY_STEPS:-20}"
probe() {  # probe NAME CAP CACHE COMPILE-MODE ARGS...
  local name=$1 cap=$2 cache=$3 mode=$4; shift 4
  echo "[startup.sh $(date +%T)] $name (limit ${cap}s)" >&2
  DIFFNAS_KERNEL_CACHE="$cache" DIFFNAS_COMPILE="$mode" timeout -k 5 "$cap" \
      $PY benchmarks/gpu/compile_probe.py --config demo --batch 32 --steady-steps "$STEADY" \
      --label "$name" "$@" >"$OUT/$name.out" 2>>"$OUT/startup.log"
  echo "[startup.sh $(date +%T)] $name: exit $?" >&2
}
A=/tmp/diffnas-kc-a-$$; B=/tmp/diffnas-kc-b-$$
case "${1:-compile}" in
  compile)
    probe eager_cold "${EAGER_CAP:-150}" "$A" off
    probe eager_warm 90 "$A" off
    probe compiled_cold "${COMPILED_CAP:-200}" "$B" on
    probe compiled_warm 90 "$B" on ;;
  optimizer)
    probe mlx_cold 120 "$A" off --sample-batch 0 --optimizer mlx
    probe fused_cold 120 "$B" fused --sample-batch 0
    probe fused_warm 120 "$B" fused --sample-batch 0
    probe mlx_warm 120 "$A" off --sample-batch 0 --optimizer mlx ;;
  *) echo "startup.sh: unknown set '$1' (compile or optimizer)" >&2; exit 2 ;;
esac
tail -q -n 1 "$OUT"/*.out
