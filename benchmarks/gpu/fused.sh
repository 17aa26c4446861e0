#!/usr/bin/env bash
# The eager GPU train step with MLX's AdamW (DIFFNAS_COMPILE=off, the GPU's default) against
# the engine's fused per-array update (=fused, engine/training/fused.py), side by side on one GPU: four fresh processes of
# compile_probe.py, two kernel-cache folders (each optimizer cold, then warm).
#
#   export PYTHONPATH=/path/to/mlx-and-mlx-cuda-13   # ../shared/GPU.md
#   OUT=/some/folder bash benchmarks/gpu/fused.sh     # the device tool sets $OUT
set -u
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${OUT:-/tmp/diffnas-fused}"
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset MLX_PTX_CACHE_DIR
PY="${PYTHON:-python3}"
probe() {  # probe NAME CACHE OPTIMIZER COMPILE-MODE
  echo "[fused.sh $(date +%T)] $1" >&2
  DIFFNAS_KERNEL_CACHE="$2" DIFFNAS_COMPILE="$4" timeout -k 5 120 $PY benchmarks/gpu/compile_probe.py --config demo \
      --batch 32 --steady-steps "${STEADY_STEPS:-30}" --sample-batch 0 --optimizer "$3" \
      --label "$1" >"$OUT/$1.out" 2>>"$OUT/fused.log"
}
MLXC=/tmp/diffnas-kc-mlx-$$; FUSEDC=/tmp/diffnas-kc-fused-$$
probe mlx_cold "$MLXC" mlx off       # the GPU's default: nothing compiled
probe fused_cold "$FUSEDC" engine fused
probe fused_warm "$FUSEDC" engine fused
probe mlx_warm "$MLXC" mlx off
tail -q -n 1 "$OUT"/*.out
