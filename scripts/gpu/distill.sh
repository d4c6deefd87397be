#!/usr/bin/env bash
# Stage-2 (KD) throughput and peak memory of recipes/smollm2-135m/gdn.yaml (8 of 30 layers attention, seq 2048),
# compiled layers (the default) against eager, the CUDA checks of the compiled path first, and the KD-loss memory at
# vocabulary 128K last (docs/benchmarks.md, "Distillation throughput"). Runs on any CUDA machine with hybridize
# installed. Usage: bash scripts/gpu/distill.sh   (OUT: logs and per-step metrics; default runs/gpu/distill)
set -uo pipefail
export OUT=${OUT:-runs/gpu/distill} TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
source scripts/gpu/versions.sh
python3 -m pytest tests/model/test_compiling.py tests/distill/test_distill_trainer.py -k "compil" -q \
  -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/compile_tests.log"
for variant in eager compiled; do
  override=$([ "$variant" = eager ] && echo "--set compile=false")
  rm -rf "$OUT/$variant"
  python3 scripts/bench_distill.py throughput --out "$OUT/$variant" $override 2>&1 | tr '\r' '\n' \
    | grep -v "it/s\]\|s/it\]" | tail -22 | tee "$OUT/throughput_$variant.log"
done
python3 scripts/bench_distill.py compare "$OUT/eager" "$OUT/compiled" | tee "$OUT/compare.log"
python3 scripts/bench_distill.py loss-memory 2>&1 | tail -15 | tee "$OUT/loss_memory.log"
