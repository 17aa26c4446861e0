#!/usr/bin/env bash
# Issue 16 part 3, peak memory, on one lent GPU in one call (see README.md here): the
# engine's training step and DDIM-20 with MLX's cap on a CUDA graph's memory at its default
# and at 50 MB, processes alternating (MLX reads the cap once a process); single layers
# beside torch's; then throughput.py's side-by-side rows (MLX eager, the engine's default on
# a CUDA GPU, against torch eager and its best variant).
#
#   export PYTHONPATH=/path/to/mlx-and-mlx-cuda-13; OUT=/some/folder bash benchmarks/gpu/memory.sh
set -u
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${OUT:-/tmp/diffnas-memory}"
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" OPENBLAS_NUM_THREADS=1 DIFFNAS_COMPILE=off
PY="${PYTHON:-python3}"
log() { echo "[memory.sh $(date +%T)] $*" | tee -a "$OUT/memory.log" >&2; }
M=benchmarks/gpu/memory_peak.py
for i in 1 2 3; do
  for mb in default 50; do  # MLX's own cap (1000 MB on Hopper), then 50 MB
    log "steps $i, graph MB $mb"
    cap=$([ $mb = default ] || echo MLX_MAX_MB_PER_BUFFER=$mb)
    env $cap timeout 100 $PY $M mlx --config demo large --batch 32 256 --rounds 3 --steps 5 \
      >>"$OUT/steps.jsonl" 2>>"$OUT/memory.log"
    env $cap timeout 80 $PY $M mlx --sampling --config demo large --batch 1 16 --rounds 3 \
      --steps 3 >>"$OUT/sampling.jsonl" 2>>"$OUT/memory.log"
  done
done
log layers; timeout 60 $PY $M mlx --layers --batch 256 >"$OUT/layers.jsonl" 2>>"$OUT/memory.log"
timeout 60 $PY $M torch --batch 256 >>"$OUT/layers.jsonl" 2>>"$OUT/memory.log"
log compare
timeout 240 $PY benchmarks/throughput.py --compare --mlx-python "$PY" --torch-python "$PY" \
  --threads 1 --mlx-blas openblas --skip-equivalence --windows 5 --min-window-s 0.3 \
  --config demo --config large --batch 32 256 --sample-batches 1 --mlx-variants eager \
  --torch-variants eager,cudagraph,cudagraph+bf16 --skip large:train_b32_eager --skip large:train_b32_cudagraph --skip large:train_b32_cudagraph+bf16 \
  --skip large:sample_b1_cudagraph --skip large:sample_b1_cudagraph+bf16 \
  --peak-tflops 50.6 781 --json-out "$OUT/compare.json" --md-out "$OUT/compare.md" 2>>"$OUT/memory.log"
rm -f "$OUT"/compare.partial.*  # the device tool brings back a few files only
log done
