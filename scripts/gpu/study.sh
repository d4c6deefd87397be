#!/usr/bin/env bash
# The design study (docs/results.md, "What each design choice buys"): scripts/study.py's runs, each distilled,
# evaluated and, where the study asks, benched, into runs/study/NAME; then the report (runs/study/study.json and
# the charts). Resumable: runs already evaluated are skipped. Runs on any CUDA machine with hybridize installed.
# Usage: bash scripts/gpu/study.sh [RUN ...]   (no RUN: every run; DEADLINE_S: start no run after that many seconds;
# OUT: logs and versions.txt, default runs/gpu/study)
set -uo pipefail
export OUT=${OUT:-runs/gpu/study} TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
source scripts/gpu/versions.sh
mkdir -p runs/study
[ -f runs/analyze-smollm2/plan.json ] || cp -r docs/results/analyze-smollm2 runs/  # the committed analysis
python3 scripts/study.py run --deadline "${DEADLINE_S:-inf}" ${1:+--only "$@"} 2>&1 | tee "$OUT/study.log" \
  | grep "^\\$\|failed\|Error" | tail -20
python3 scripts/study.py report --root runs/study > /dev/null
