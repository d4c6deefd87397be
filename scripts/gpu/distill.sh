#!/usr/bin/env bash
# Run on the lent GPU (teacher joined): stage-2 throughput and peak memory of the SmolLM2 recipe (8 of 30 layers
# attention, seq 2048), compiled layers (the default) against eager in the same call, the CUDA checks of the
# compiled path first, and the KD-loss memory at vocabulary 128K last. Usage: bash scripts/gpu/distill.sh
source scripts/gpu/env.sh
python3 -m pytest tests/model/test_compiling.py tests/distill/test_distill_trainer.py -k "compil" -q \
  -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/compile_tests.log"
for variant in eager compiled; do
  override=$([ "$variant" = eager ] && echo "--set compile=false")
  rm -rf "/root/bench-$variant"
  python3 scripts/bench_distill.py throughput --out "/root/bench-$variant" $override 2>&1 | tr '\r' '\n' \
    | grep -v "it/s\]\|s/it\]" | tail -22 | tee "$OUT/throughput_$variant.log"
  cp "/root/bench-$variant/metrics.jsonl" "$OUT/metrics_$variant.jsonl" 2>/dev/null
done
python3 scripts/bench_distill.py compare /root/bench-eager /root/bench-compiled | tee "$OUT/compare.log"
timeout 120 python3 scripts/bench_distill.py loss-memory 2>&1 | tail -15 | tee "$OUT/loss_memory.log"
