#!/usr/bin/env bash
# The shipped recipe recipes/smollm2-135m/windows-sinks.yaml exactly as a user runs it, then `hybridize eval`,
# `hybridize bench` at 8K / batch 16 and `hybridize push --dry-run` on it (docs/results.md). Resumable: a second
# call goes on from the run's last checkpoint and skips the steps already done. Runs on any CUDA machine with
# hybridize installed.
# Usage: bash scripts/gpu/headline.sh [NAME PLAN]   (with NAME and PLAN: the same recipe with `--set plan=PLAN`,
# into runs/NAME; OUT: logs and versions.txt, default runs/gpu/headline)
set -uo pipefail
export OUT=${OUT:-runs/gpu/headline} TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
source scripts/gpu/versions.sh
recipe=recipes/smollm2-135m/windows-sinks.yaml
name=${1:-headline}
if [ -n "${2:-}" ]; then
  run=runs/$name
  overrides=(--set "plan=$2" --out "$run")
else
  run=runs/smollm2-135m-windows-sinks  # the recipe's output_dir
  overrides=()
fi
if [ ! -f "$run/final/config.json" ]; then
  resume=$([ -f "$run/run.json" ] && echo --resume)
  python3 -m hybridize distill "$recipe" "${overrides[@]}" $resume 2>&1 \
    | tr '\r' '\n' | grep -v "it/s\]\|s/it\]" | tail -25 | tee -a "$OUT/$name.distill.log"
fi
if [ -f "$run/final/config.json" ] && [ ! -f "$run/eval/eval.json" ]; then
  python3 -m hybridize eval "$run/final" --out "$run/eval" 2>&1 | tail -30 | tee -a "$OUT/$name.eval.log"
fi
if [ -f "$run/eval/eval.json" ] && [ ! -f "$run/bench/bench.json" ]; then
  # 8K / batch 16, the hybrid's fast path against the teacher's best; every path at several points takes minutes more.
  python3 -m hybridize bench "$run/final" --contexts 8192 --batch-sizes 16 --paths hybrid-fast,teacher-static \
    --out "$run/bench" 2>&1 | grep -v Warn | tail -30 | tee -a "$OUT/$name.bench.log"
  python3 -m hybridize push "$run/final" my-org/smollm2-135m-hybrid --dry-run "$run/push" --overwrite 2>&1 | tail -3
fi
