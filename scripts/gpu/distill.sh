#!/usr/bin/env bash
# Run on the lent GPU: stage-2 throughput and peak memory of the SmolLM2 recipe (8 of 30 layers attention, seq 2048),
# and the KD-loss memory at vocabulary 128K. Usage: bash scripts/gpu/distill.sh
source scripts/gpu/env.sh
python3 scripts/bench_distill.py throughput --out /root/bench-1gpu 2>&1 | tail -25 | tee "$OUT/throughput_1gpu.log"
cp /root/bench-1gpu/metrics.jsonl "$OUT/metrics_1gpu.jsonl" 2>/dev/null
python3 scripts/bench_distill.py loss-memory 2>&1 | tail -15 | tee "$OUT/loss_memory.log"
