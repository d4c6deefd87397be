#!/usr/bin/env bash
# Run on the lent GPU: kernel correctness against the fp32 references, and the kernel benchmarks vs fla-core.
# Usage (device tool, carrying .whl; one stage per call, each sized to fit a call's 10-minute limit):
#   bash scripts/gpu/kernels.sh sweep     the every-config sweep: each GDN kernel config autotuning may pick, at
#                                        K 16/32/64/128 (118 cases; in run 11 these and the rest of tests/kernels,
#                                        together, did not finish in a 540-s call)
#   bash scripts/gpu/kernels.sh kernels   the other CUDA tests under tests/kernels
#   bash scripts/gpu/kernels.sh model     the CUDA tests under tests/model (run 11: these and 7 fast-decode cases
#                                        filled a 420-s call)
#   bash scripts/gpu/kernels.sh rest      the CUDA tests under tests/evaluate, analyze and distill; three need the
#                                        teacher joined (.teacher/a, then .teacher/b; about 3 min for those three)
#   bash scripts/gpu/kernels.sh headline  GDN chunk fwd, fwd+bwd and decode step at the shapes, then the
#                                        per-kernel profile of the fwd+bwd
#   bash scripts/gpu/kernels.sh models    GDN at the SmolLM2 and Llama-3.2-1B shapes, T 2K/8K/32K
#   bash scripts/gpu/kernels.sh others    SSD, conv/norm, decode attention, window attention
# Each stage writes $OUT/STAGE.log. pytest runs verbose with a per-test limit, so a log cut by the call's limit
# still names every test that finished, and a hung test fails alone.
source scripts/gpu/env.sh
stage=${1:?usage: kernels.sh sweep|kernels|model|rest|headline|models|others}
log="$OUT/$stage.log"
pytest_cuda() {  # pytest_cuda SELECTION PATHS...
  local selection=$1; shift
  python3 -m pytest "$@" -k "$selection" -v -p no:cacheprovider -rfE --tb=short --timeout 150 --durations=10 >"$log" 2>&1
  echo "pytest rc $?" >>"$log"
  grep -c PASSED "$log"; grep -E "^(FAILED|ERROR)|pytest rc|passed|failed" "$log" | tail -20
}
bench() {
  for script in "$@"; do
    echo "== $script" | tee -a "$log"; timeout 280 python3 $script 2>&1 | tee -a "$log" | tail -40
  done
}
case "$stage" in
  sweep) pytest_cuda "cuda and every_config" tests/kernels ;;
  kernels) pytest_cuda "cuda and not every_config" tests/kernels ;;
  model) pytest_cuda cuda tests/model ;;
  rest) pytest_cuda cuda tests/evaluate tests/analyze tests/distill ;;
  headline) bench "scripts/bench_gated_delta.py --headline" "scripts/bench_gated_delta.py --profile" ;;
  models) bench "scripts/bench_gated_delta.py --models" ;;
  others) bench scripts/bench_ssd.py scripts/bench_conv_norm.py scripts/bench_decode_attention.py \
    scripts/bench_window_attention.py ;;
  *) echo "kernels.sh: unknown stage '$stage' (sweep, kernels, model, rest, headline, models or others)" >&2
     exit 2 ;;
esac
