#!/usr/bin/env bash
# Run on the lent GPU (teacher joined): the headline hybrid from its shipped recipe, exactly as a user runs it, then
# `hybridize eval`, `hybridize bench` and `hybridize push --dry-run` on it. Resumable across calls on one machine:
# each call goes on from the run's last checkpoint and skips the steps already done.
# Usage: bash scripts/gpu/headline.sh [DISTILL_SECONDS [NAME PLAN]]
# With NAME and PLAN: the same recipe with another plan (`--set plan=PLAN`), into runs/NAME, results as NAME_results.tar.
source scripts/gpu/env.sh
mkdir -p /root/runs
ln -sfn /root/runs runs
recipe=recipes/smollm2-135m/windows-sinks.yaml
name=${2:-headline}
if [ -n "${3:-}" ]; then
  run=runs/$name
  overrides=(--set "plan=$3" --out "$run")
else
  run=runs/smollm2-135m-windows-sinks  # the recipe's output_dir
  overrides=()
fi
if [ ! -f "$run/final/config.json" ]; then
  resume=$([ -f "$run/run.json" ] && echo --resume)
  /usr/bin/time -f "distill wall %e s" timeout "${1:-540}" python3 -m hybridize.cli distill "$recipe" "${overrides[@]}" \
    $resume 2>&1 \
    | tr '\r' '\n' | grep -v "it/s\]\|s/it\]" | tail -25 | tee -a "$OUT/distill.log"
fi
if [ -f "$run/final/config.json" ] && [ ! -f "$run/eval/eval.json" ]; then
  /usr/bin/time -f "eval wall %e s" python3 -m hybridize.cli eval "$run/final" --out "$run/eval" 2>&1 | tail -30 \
    | tee -a "$OUT/eval.log"
fi
if [ -f "$run/eval/eval.json" ] && [ ! -f "$run/bench/bench.json" ]; then
  # The bar point only, hybrid fast path against the teacher's best: all four paths at 2 x 2 points take > 6 min.
  python3 -m hybridize.cli bench "$run/final" --contexts 8192 --batch-sizes 16 --paths hybrid-fast,teacher-static \
    --out "$run/bench" 2>&1 | grep -v Warn | tail -30 | tee -a "$OUT/bench.log"
  python3 -m hybridize.cli push "$run/final" hybridize/smollm2-135m-hybrid --dry-run "$run/push" --overwrite 2>&1 | tail -3
fi
flat=$(mktemp -d)
for file in "$run/eval/eval.json" "$run/bench/bench.json" "$run/metrics.jsonl" "$run/push/README.md" \
            "$run/final/distill.json" "$run/loss_curve.png"; do
  cp "$file" "$flat/$(basename "$(dirname "$file")").$(basename "$file")" 2>/dev/null
done
tar -cf "$OUT/${name}_results.tar" -C "$flat" .
