#!/usr/bin/env bash
# Kernel correctness on the GPU against the fp32 references, and the kernel benchmarks against fla-core
# (scripts/bench/run.py, docs/benchmarks.md). Runs on any CUDA machine with hybridize installed
# (pip install -e ".[dev]"); the benchmarks' peer column needs fla-core (pip install fla-core).
# Usage: bash scripts/gpu/kernels.sh STAGE     (OUT: where STAGE.log and versions.txt go; default runs/gpu/kernels)
#   sweep     the every-config sweep: each GDN kernel config autotuning may pick, at K 16/32/64/128
#   kernels   the other CUDA tests under tests/kernels
#   model     the CUDA tests under tests/model
#   rest      the CUDA tests under tests/evaluate, tests/analyze and tests/distill
#   headline  GDN chunk fwd and fwd+bwd at B4 T4096 H16 D128 and decode step at B64, then the per-kernel profile
#   models    GDN at the SmolLM2 and Llama-3.2-1B shapes: decode steps at B64/B512, chunks at T 2K/8K/32K
#   others    SSD, conv1d, gated RMSNorm, decode attention, window attention, every shape set
# Each benchmark stage also writes its table's JSON record to $OUT/STAGE.json.
# pytest runs verbose, so the log names every test; with pytest-timeout each test has a limit and a hung one fails alone.
set -uo pipefail
export OUT=${OUT:-runs/gpu/kernels} TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
source scripts/gpu/versions.sh
stage=${1:?usage: kernels.sh sweep|kernels|model|rest|headline|models|others}
log="$OUT/$stage.log"
# A per-test limit where pytest-timeout is installed (pip install pytest-timeout).
per_test_limit=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 150")
pytest_cuda() {  # pytest_cuda SELECTION PATHS...
  local selection=$1; shift
  python3 -m pytest "$@" -k "$selection" -v -p no:cacheprovider -rfE --tb=short $per_test_limit --durations=10 >"$log" 2>&1
  echo "pytest rc $?" >>"$log"
  grep -c PASSED "$log"; grep -E "^(FAILED|ERROR)|pytest rc|passed|failed" "$log" | tail -20
}
bench() {  # bench ARGS...: one run.py call, its output appended to the log
  echo "== run.py $*" | tee -a "$log"; python3 scripts/bench/run.py "$@" 2>&1 | tee -a "$log" | tail -40
}
case "$stage" in
  sweep) pytest_cuda "cuda and every_config" tests/kernels ;;
  kernels) pytest_cuda "cuda and not every_config" tests/kernels ;;
  model) pytest_cuda cuda tests/model ;;
  rest) pytest_cuda cuda tests/evaluate tests/analyze tests/distill ;;
  headline) bench --case gated_delta --json "$OUT/headline.json"
    bench --case gated_delta.chunk --profile ;;
  models) bench --case gated_delta --shapes models --json "$OUT/models.json" ;;
  others) bench --case ssd --case conv1d --case gated_rms_norm --case decode_attention --case window_attention \
    --shapes all --json "$OUT/others.json" ;;
  *) echo "kernels.sh: unknown stage '$stage' (sweep, kernels, model, rest, headline, models or others)" >&2
     exit 2 ;;
esac
