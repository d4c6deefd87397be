#!/usr/bin/env bash
# A shipped recipe exactly as a user runs it, then `hybridize eval` (the full suite), `hybridize bench` at 8K / batch
# 16 and `hybridize push --dry-run`, and the result folder that docs/results.md cites: eval.json, bench.json,
# distill.json, metrics.jsonl, loss_curve.png, the final config.json and conversion.json, the model card; no weights.
# Resumable: a second call goes on from the run's last checkpoint and skips the steps already done.
# Runs on any CUDA machine with hybridize installed.
# Usage: bash scripts/gpu/recipe.sh RECIPE [DISTILL ARGS...]
#   e.g. NAME=planF-12m bash scripts/gpu/recipe.sh recipes/smollm2-135m/windows-sinks.yaml --set plan=PLAN
# NAME: the run, under runs/ (default: the recipe's file name); OUT: logs, versions.txt and results/ (default
# runs/gpu/NAME); EVAL_ARGS: extra `hybridize eval` arguments.
set -uo pipefail
recipe=${1:?usage: recipe.sh RECIPE [DISTILL ARGS...]}; shift
name=${NAME:-$(basename "$recipe" .yaml)}
export OUT=${OUT:-runs/gpu/$name} TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
source scripts/gpu/versions.sh
run=runs/$name
quiet() { tr '\r' '\n' | grep -v "it/s\]\|s/it\]\|Warn"; }
if [ ! -f "$run/final/config.json" ]; then
  resume=(); [ -f "$run/run.json" ] && resume=(--resume)
  python3 -m hybridize distill "$recipe" --out "$run" "${resume[@]}" "$@" 2>&1 | quiet | tee -a "$OUT/distill.log" \
    | tail -25
fi
[ -f "$run/final/config.json" ] || { echo "distill did not finish: $OUT/distill.log"; exit 1; }
[ -f "$run/eval/eval.json" ] || python3 -m hybridize eval "$run/final" --out "$run/eval" ${EVAL_ARGS:-} 2>&1 | quiet \
  | tee -a "$OUT/eval.log" | tail -30
if [ ! -f "$run/bench/bench.json" ]; then
  # 8K / batch 16, the hybrid's fast path against the teacher's best; every path at several points takes minutes more.
  python3 -m hybridize bench "$run/final" --contexts 8192 --batch-sizes 16 --paths hybrid-fast,teacher-static \
    --out "$run/bench" 2>&1 | quiet | tee -a "$OUT/bench.log" | tail -30
fi
python3 -m hybridize push "$run/final" "my-org/$name" --dry-run "$run/push" --overwrite 2>&1 | tail -3
results=$OUT/results
mkdir -p "$results"
for file in eval/eval.json eval/passkey.png bench/bench.json final/distill.json metrics.jsonl loss_curve.png \
            final/config.json init/conversion.json; do
  [ -f "$run/$file" ] && cp "$run/$file" "$results/"
done
[ -f "$run/push/README.md" ] && cp "$run/push/README.md" "$results/model_card.md"
ls "$results"
