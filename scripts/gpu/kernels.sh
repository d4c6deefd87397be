#!/usr/bin/env bash
# Run on the lent GPU: kernel correctness against the fp32 references, then the kernel benchmarks vs fla-core.
# Usage (device tool, carrying .whl): bash scripts/gpu/kernels.sh [--bench-only]
# Ordered so that a call's time limit cuts the slowest, least informative parts: the shape and model checks, then
# the headline benchmarks, then the every-config sweep (one test per autotune config: minutes), then every shape.
source scripts/gpu/env.sh
tests="tests/kernels tests/model tests/evaluate/test_fast_decode.py"
if [ "${1:-}" != "--bench-only" ]; then
  python3 -m pytest $tests -k "cuda and not every_config" -q -p no:cacheprovider 2>&1 | tee "$OUT/kernel_tests.log" | tail -20
fi
for bench in "scripts/bench_gated_delta.py --headline" scripts/bench_window_attention.py; do
  echo "== $bench"; timeout 300 python3 $bench 2>&1 | tee -a "$OUT/bench.log" | tail -20
done
if [ "${1:-}" != "--bench-only" ]; then
  python3 -m pytest $tests -k "every_config_cuda" -q -p no:cacheprovider 2>&1 | tee "$OUT/kernel_sweep.log" | tail -20
fi
for bench in scripts/bench_gated_delta.py scripts/bench_decode_attention.py scripts/bench_ssd.py scripts/bench_conv_norm.py; do
  echo "== $bench"; timeout 200 python3 "$bench" 2>&1 | tee -a "$OUT/bench.log" | tail -60
done
