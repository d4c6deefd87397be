#!/usr/bin/env bash
# Two plans that keep recall past the window, each with the shipped recipe (12M tokens) and only its plan changed:
# plan F (attention at layers 3-9 and 18) and the analyzer's plan with every window scored as a sink window (the
# shipped recipe's plan; docs/runs/headline-12m_h100_2026-11-23.md). Resumable like recipe.sh. Runs on any CUDA
# machine with hybridize installed.
# Usage: bash scripts/gpu/candidates.sh   (runs under runs/; OUT: the analysis log and one recipe.sh folder per plan,
# default runs/gpu/candidates)
set -uo pipefail
out=${OUT:-runs/gpu/candidates}
analysis=runs/analyze-smollm2-s4
if [ ! -f "$analysis/plan.json" ]; then
  mkdir -p "$out"
  python3 -m hybridize analyze --budget 8 --sink-tokens 4 --out "$analysis" --overwrite 2>&1 | tail -12 \
    | tee -a "$out/analyze.log"
fi
plan_f=$(cd scripts && python3 -c "import study; print(study.PLAN_F)")
recipe=recipes/smollm2-135m/windows-sinks.yaml
OUT=$out/planF-12m NAME=planF-12m bash scripts/gpu/recipe.sh $recipe --set "plan=$plan_f"
OUT=$out/analyzer-s4-12m NAME=analyzer-s4-12m bash scripts/gpu/recipe.sh $recipe --set "plan=$analysis/plan.json"
