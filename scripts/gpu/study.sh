#!/usr/bin/env bash
# Run on the lent GPU (teacher joined): the results study, resumable across calls on the same machine.
# Usage: bash scripts/gpu/study.sh [DEADLINE_S] [RUN ...]   (runs under /root/runs, outside the repo copy, which
# every call replaces; the analyzer's plan is taken from docs/results/analyze-smollm2/ when runs/ has none)
source scripts/gpu/env.sh
deadline=${1:-300}; shift || true
mkdir -p /root/runs/study
[ -f /root/runs/analyze-smollm2/plan.json ] || cp -r docs/results/analyze-smollm2 /root/runs/
ln -sfn /root/runs runs
python3 scripts/study.py run --deadline "$deadline" ${1:+--only "$@"} 2>&1 | grep "^\\$\|failed\|Error" | tail -20
python3 scripts/study.py report > /dev/null
# Flat copies in one tar: the device tool returns at most 8 files, at most 2 folders down. Locally:
# tar -xf study_results.tar -C FLAT && python scripts/study.py collect FLAT --root docs/results/study
flat=$(mktemp -d)
cp /root/runs/study/study.json "$flat/" 2>/dev/null
for run in /root/runs/study/*/; do
  name=$(basename "$run")
  cp "$run/eval/eval.json" "$flat/$name.eval.json" 2>/dev/null
  cp "$run/bench/bench.json" "$flat/$name.bench.json" 2>/dev/null
done
for file in /root/runs/analyze-smollm2-s4/*; do  # the sink-scored analysis, committed beside the plain one
  cp "$file" "$flat/analyze-smollm2-s4.$(basename "$file")" 2>/dev/null
done
tar -cf "$OUT/study_results.tar" -C "$flat" .
