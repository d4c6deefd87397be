#!/usr/bin/env bash
# Run on the lent GPU (teacher joined): the two headline candidates that keep recall past the window, each with the
# shipped headline recipe (12M tokens) and only its plan changed: plan F (attention at layers 3-9 and 18, the best
# passkey of the 3M-token study) and the analyzer's own plan when it scores every window as a sink window (since
# session 7 the shipped recipe's plan: docs/results.md, sixth pass).
# Resumable like headline.sh. Usage: bash scripts/gpu/candidates.sh
# Returns planF-12m_results.tar, analyzer-s4-12m_results.tar and analyze-s4.tar (the analysis, for docs/results/).
source scripts/gpu/env.sh
mkdir -p /root/runs
ln -sfn /root/runs runs
analysis=runs/analyze-smollm2-s4
if [ ! -f "$analysis/plan.json" ]; then
  /usr/bin/time -f "analyze wall %e s" python3 -m hybridize.cli analyze --budget 8 --sink-tokens 4 --out "$analysis" \
    --overwrite 2>&1 | tail -12 | tee -a "$OUT/analyze.log"
fi
plan_f=$(cd scripts && python3 -c "import study; print(study.PLAN_F)")
bash scripts/gpu/headline.sh 1200 planF-12m "$plan_f"
bash scripts/gpu/headline.sh 1200 analyzer-s4-12m "$analysis/plan.json"
tar -cf "$OUT/analyze-s4.tar" -C "$analysis" .
