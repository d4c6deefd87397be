#!/usr/bin/env bash
# A recurrent recipe's recall, and the checks that tell a kernel defect from a modelling limit (docs/results.md):
#   1. distill the recipe (extra arguments go to `hybridize distill`, e.g. --set stages.1.tokens=20_000_000);
#   2. eval the converted model before training (init/) and the distilled one (final/), recall suite included;
#   3. the same passkey and MQAR on final/ through the fp32 PyTorch references (HYBRIDIZE_KERNELS=reference);
#   4. the needle trace of final/ on both paths (scripts/needle_trace.py).
# Runs on any CUDA machine with hybridize installed.
# Usage: bash scripts/gpu/recall.sh RECIPE [DISTILL ARGS...]   (OUT: logs and results; default runs/gpu/recall)
#   e.g. OUT=runs/gpu/recall-plain bash scripts/gpu/recall.sh recipes/smollm2-135m/gdn.yaml --set recurrent_rope=false
# EVAL_ARGS: extra `hybridize eval` arguments for step 2 (default: the full suite).
# Re-entrant: run again after an interruption, it resumes the distillation from its last checkpoint and skips the
# steps whose results exist.
set -uo pipefail
export OUT=${OUT:-runs/gpu/recall} TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
source scripts/gpu/versions.sh
recipe=${1:?usage: recall.sh RECIPE [DISTILL ARGS...]}; shift
run=$OUT/run
quiet() { tr '\r' '\n' | grep -v "it/s\]\|s/it\]\|Warn"; }
started=$SECONDS
if [ ! -f "$run/final/config.json" ]; then
  resume=(); [ -f "$run/run.json" ] && resume=(--resume)
  python3 -m hybridize distill "$recipe" --out "$run" "${resume[@]}" "$@" 2>&1 | quiet | tee -a "$OUT/distill.log" \
    | tail -25
  echo "distill wall $((SECONDS - started)) s"
fi
for model in init final; do
  [ -f "$OUT/eval-$model/eval.json" ] || python3 -m hybridize eval "$run/$model" --out "$OUT/eval-$model" \
    ${EVAL_ARGS:-} 2>&1 | quiet | tail -22
done
# Recall only, on the references: one short block of one domain stands in for the quality part.
[ -f "$OUT/eval-final-reference/eval.json" ] || HYBRIDIZE_KERNELS=reference python3 -m hybridize eval "$run/final" \
  --out "$OUT/eval-final-reference" --domains code --blocks 1 --greedy-prompts 1 ${EVAL_ARGS:-} 2>&1 | quiet | tail -12
[ -f "$OUT/trace.json" ] || python3 scripts/needle_trace.py "$run/final" --out "$OUT/trace.json" 2>&1 | quiet
[ -f "$OUT/trace-reference.json" ] || HYBRIDIZE_KERNELS=reference python3 scripts/needle_trace.py "$run/final" \
  --out "$OUT/trace-reference.json" 2>&1 | quiet
