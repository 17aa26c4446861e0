#!/usr/bin/env bash
# Issue 16 part 3 on one lent H200, in one call of at most 10 minutes (see README.md here).
#
#   export PYTHONPATH=/path/to/mlx-and-mlx-cuda-13   # no uv, no registry on that host
#   OUT=/some/folder bash benchmarks/gpu/h200.sh     # the device tool sets $OUT
#
# (b) MLX's start-up cost, cold then warm kernel cache (two fresh processes, one folder);
# (a)+(c) throughput.py best against best with peak memory: demo b32/b256, large b256,
# DDIM-20 b1/b16. Every piece has a time limit inside a 530 s deadline, and every
# measurement is appended to $OUT as it is made, so a piece cut short keeps what it measured.
set -u
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${OUT:-/tmp/diffnas-h200}"
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OPENBLAS_NUM_THREADS=1
# This script times MLX's compiled step (its eager rows opt out themselves); the engine's
# default on a CUDA GPU is eager (engine/device/compile_mode.py).
export DIFFNAS_COMPILE="${DIFFNAS_COMPILE:-on}"
PY="${PYTHON:-python3}"        # the driver; the H200 host runs both sides in python3
MLX_PY="${MLX_PY:-$PY}"; TORCH_PY="${TORCH_PY:-$PY}"  # a dry run elsewhere may split them
DEADLINE=$((SECONDS + ${BUDGET_S:-530}))
LOG="$OUT/h200.log"

# A fresh kernel cache folder, so that the first probe is a cold start; the diffnas
# default (engine.device.kernel_cache) is what is measured, not a variable set by hand.
unset MLX_PTX_CACHE_DIR
export DIFFNAS_KERNEL_CACHE="${DIFFNAS_KERNEL_CACHE:-/tmp/diffnas-kc-$$}"

say() { echo "[h200.sh $(date +%T) +${SECONDS}s] $*" | tee -a "$LOG" >&2; }
# limit CAP: the smaller of CAP and what the deadline leaves (minus a 5 s reserve)
limit() { local left=$((DEADLINE - SECONDS - 5)); [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }
run_piece() {  # run_piece NAME CAP CMD...: stdout to $OUT/NAME.out, stderr to the log
  local name=$1 cap; cap=$(limit "$2"); shift 2
  if [ "$cap" -lt 15 ]; then say "$name: skipped, ${cap}s left"; return; fi
  say "$name: start (limit ${cap}s)"
  timeout -k 5 "$cap" "$@" >"$OUT/$name.out" 2>>"$LOG"
  say "$name: exit $? after $((SECONDS - start_s))s"
}

say "host $(hostname), $(nproc) cores; kernel cache $DIFFNAS_KERNEL_CACHE"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $TORCH_PY -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'python', platform.python_version())"
  $MLX_PY -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())"
  ls -d /tmp/torchinductor_* 2>/dev/null | sed 's/^/inductor cache present: /'
} >"$OUT/versions.txt" 2>>"$LOG"
cat "$OUT/versions.txt" >&2

# (b) cold, then warm: the demo's compiled train step at b32 and one DDIM-20 run at b1.
start_s=$SECONDS; run_piece probe_cold 150 $MLX_PY benchmarks/gpu/compile_probe.py --config demo --batch 32 --label cold
start_s=$SECONDS; run_piece probe_warm 60 $MLX_PY benchmarks/gpu/compile_probe.py --config demo --batch 32 --label warm

COMMON=(--compare --mlx-python "$MLX_PY" --torch-python "$TORCH_PY" --threads 1 --mlx-blas openblas --skip-equivalence
        --sample-steps 20 --windows 5 --min-window-s 0.3 --train-warmup 2 --peak-tflops 50.6 781)

# worker limits for a compare piece of CAP seconds: MLX gets $1 parts, torch $2 parts of
# what is left after about 25 s of device reports and interpreter starts
split() { local cap; cap=$(limit "$1"); local rest=$((cap - 25)); [ $rest -lt 10 ] && rest=10
  MT=$((rest * $2 / ($2 + $3))); TT=$((rest * $3 / ($2 + $3))); }

# (a)+(c) demo: MLX compiled fp32 (b32, b256) and bf16 (b256); torch eager baseline, whole
# step as a CUDA graph (fp32, bf16), torch.compile (b256) and reduce-overhead (b256, b1).
split 235 3 4; start_s=$SECONDS; run_piece demo 235 "$PY" benchmarks/throughput.py "${COMMON[@]}" \
  --config demo --batch 32 256 --sample-batches 1 16 \
  --mlx-variants compiled,compiled-bf16 --skip demo:train_b32_compiled-bf16 \
  --torch-variants eager,cudagraph,cudagraph+bf16,compile-ro,compile,fused+bf16+channels_last \
  --skip demo:train_b32_compile --skip demo:sample_b1_compile --skip demo:sample_b16_compile \
  --skip demo:train_b32_compile-ro --skip demo:sample_b16_compile-ro \
  --skip demo:train_b32_fused+bf16+channels_last \
  --mlx-timeout $MT --torch-timeout $TT --json-out "$OUT/demo.json" --md-out "$OUT/demo.md"

# (a)+(c) large (23.8M params): MLX eager and compiled fp32; torch eager, bf16, CUDA graph bf16.
split 150 1 1; start_s=$SECONDS; run_piece large 150 "$PY" benchmarks/throughput.py "${COMMON[@]}" \
  --config large --batch 256 --sample-batches 1 16 \
  --mlx-variants eager,compiled --torch-variants eager,fused+bf16,cudagraph+bf16 \
  --mlx-timeout $MT --torch-timeout $TT --json-out "$OUT/large.json" --md-out "$OUT/large.md"

say "done; kernel cache now holds $(find "$DIFFNAS_KERNEL_CACHE" -name '*.ptx' 2>/dev/null | wc -l) modules"
cat "$OUT"/probe_*.out "$OUT"/demo.md "$OUT"/large.md 2>/dev/null | head -120
