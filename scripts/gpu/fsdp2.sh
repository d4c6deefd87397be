#!/usr/bin/env bash
# Run on the lent 2-GPU machine (teacher joined): stage-2 throughput of the SmolLM2 recipe on one GPU, then the same
# global batch under FSDP2 on 2 processes, then the loss-curve difference between the two.
# Usage (nvidia-h200-x2): bash scripts/gpu/fsdp2.sh [STEPS [BENCH ARGS...]], e.g. 20 --micro-batch 16
source scripts/gpu/env.sh
steps=${1:-20}; shift || true
rm -rf /root/bench-1gpu /root/bench-2gpu
CUDA_VISIBLE_DEVICES=0 python3 scripts/bench_distill.py throughput --steps "$steps" "$@" --out /root/bench-1gpu 2>&1 \
  | tail -22 | tee "$OUT/throughput_1gpu.log"
accelerate launch --config_file recipes/accelerate/fsdp2.yaml scripts/bench_distill.py throughput --steps "$steps" "$@" \
  --out /root/bench-2gpu 2>&1 | tail -22 | tee "$OUT/throughput_2gpu.log"
python3 scripts/bench_distill.py compare /root/bench-1gpu /root/bench-2gpu | tee "$OUT/compare.json"
cp /root/bench-1gpu/metrics.jsonl "$OUT/metrics_1gpu.jsonl" 2>/dev/null
cp /root/bench-2gpu/metrics.jsonl "$OUT/metrics_2gpu.jsonl" 2>/dev/null
