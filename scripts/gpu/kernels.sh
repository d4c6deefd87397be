#!/usr/bin/env bash
# Run on the lent GPU: kernel correctness against the fp32 references, and the kernel benchmarks vs fla-core.
# Usage (device tool, carrying .whl; one stage per call, each sized to fit a call's 10-minute limit):
#   bash scripts/gpu/kernels.sh sweep     every CUDA test under tests/kernels, the every-config sweep among them
#                                        (about 7.5 min on the H100, run 10)
#   bash scripts/gpu/kernels.sh rest      the other CUDA tests: model, evaluate, analyze, distill (about 4.5 min);
#                                        three of them need the teacher joined (.teacher/a, then .teacher/b)
#   bash scripts/gpu/kernels.sh headline  GDN chunk fwd, fwd+bwd and decode step at the shapes, then the
#                                        per-kernel profile of the fwd+bwd
#   bash scripts/gpu/kernels.sh models    GDN at the SmolLM2 and Llama-3.2-1B shapes, T 2K/8K/32K
#   bash scripts/gpu/kernels.sh others    SSD, conv/norm, decode attention, window attention
# Each stage writes $OUT/STAGE.log. pytest runs verbose with a per-test limit, so a log cut by the call's limit
# still names every test that finished, and a hung test fails alone.
source scripts/gpu/env.sh
stage=${1:?usage: kernels.sh sweep|rest|headline|models|others}
log="$OUT/$stage.log"
pytest_cuda() {
  python3 -m pytest "$@" -k cuda -v -p no:cacheprovider -rfE --tb=short --timeout 150 --durations=10 >"$log" 2>&1
  echo "pytest rc $?" >>"$log"
  grep -c PASSED "$log"; grep -E "^(FAILED|ERROR)|pytest rc|passed|failed" "$log" | tail -20
}
bench() {
  for script in "$@"; do
    echo "== $script" | tee -a "$log"; timeout 280 python3 $script 2>&1 | tee -a "$log" | tail -40
  done
}
case "$stage" in
  sweep) pytest_cuda tests/kernels ;;
  rest) pytest_cuda tests/model tests/evaluate tests/analyze tests/distill ;;
  headline) bench "scripts/bench_gated_delta.py --headline" "scripts/bench_gated_delta.py --profile" ;;
  models) bench "scripts/bench_gated_delta.py --models" ;;
  others) bench scripts/bench_ssd.py scripts/bench_conv_norm.py scripts/bench_decode_attention.py \
    scripts/bench_window_attention.py ;;
  *) echo "kernels.sh: unknown stage '$stage' (sweep, rest, headline, models or others)" >&2; exit 2 ;;
esac
