#!/usr/bin/env bash
# Stage-2 throughput of recipes/smollm2-135m/gdn.yaml on one GPU, then the same global batch under FSDP2 on 2
# processes, then the loss-curve difference between the two (docs/benchmarks.md). Needs 2 CUDA GPUs and hybridize
# installed. Usage: bash scripts/gpu/fsdp2.sh [STEPS [BENCH ARGS...]], e.g. 20 --micro-batch 16
# (OUT: logs and both runs' metrics; default runs/gpu/fsdp2)
set -uo pipefail
export OUT=${OUT:-runs/gpu/fsdp2} TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
source scripts/gpu/versions.sh
steps=${1:-20}; shift || true
rm -rf "$OUT/1gpu" "$OUT/2gpu"
CUDA_VISIBLE_DEVICES=0 python3 scripts/bench_distill.py throughput --steps "$steps" "$@" --out "$OUT/1gpu" 2>&1 \
  | tail -22 | tee "$OUT/throughput_1gpu.log"
accelerate launch --config_file recipes/accelerate/fsdp2.yaml scripts/bench_distill.py throughput --steps "$steps" "$@" \
  --out "$OUT/2gpu" 2>&1 | tail -22 | tee "$OUT/throughput_2gpu.log"
python3 scripts/bench_distill.py compare "$OUT/1gpu" "$OUT/2gpu" | tee "$OUT/compare.json"
