#!/usr/bin/env bash
# Run on the lent GPU: kernel correctness against the fp32 references, then the kernel benchmarks vs fla-core.
# Usage (device tool, carrying .whl): bash scripts/gpu/kernels.sh [--bench-only]
source scripts/gpu/env.sh
if [ "${1:-}" != "--bench-only" ]; then
  # The every-config sweep (one test per autotune config) takes minutes; it runs last, so that a call's time limit
  # cuts the sweep and not the shape and model checks.
  tests="tests/kernels tests/model/test_kernels_in_model.py tests/evaluate/test_fast_decode.py"
  python3 -m pytest $tests -k "cuda and not every_config" -q -p no:cacheprovider 2>&1 | tee "$OUT/kernel_tests.log" | tail -20
  python3 -m pytest $tests -k "every_config_cuda" -q -p no:cacheprovider 2>&1 | tee "$OUT/kernel_sweep.log" | tail -20
fi
for bench in scripts/bench_gated_delta.py scripts/bench_decode_attention.py scripts/bench_ssd.py scripts/bench_conv_norm.py; do
  echo "== $bench"; timeout 200 python3 "$bench" 2>&1 | tee -a "$OUT/bench.log" | tail -60
done
