#!/usr/bin/env bash
# Stage-2 (KD) throughput and peak memory of recipes/smollm2-135m/gdn.yaml with the GDN gate, q/k norms and beta
# formed inside the kernels (`gdn_fused_inputs: true`, the default) against formed in PyTorch (false), both from one
# converted hybrid, at each micro batch given, 15 steps of which the last 10 are timed (docs/benchmarks.md,
# "Distillation throughput"). The text is the packaged corpus: the rate depends neither on it nor on the weights.
# Both hybrids are converted without the recipe's recurrent RoPE and long-memory heads (a rotation both variants pay
# alike), as the other throughput rows in docs/benchmarks.md.
# Runs on any CUDA machine with hybridize installed.
# Usage: bash scripts/gpu/fused_inputs.sh [MICRO_BATCH ...]   (default 8; OUT: logs, default runs/gpu/fused_inputs;
# ROOT: the converted hybrids and runs, default runs/fused-inputs; TEACHER: a teacher folder of the same shape,
# e.g. from `python scripts/real_shapes.py teacher --shape smollm2-135m`, default the embedded teacher)
set -uo pipefail
export OUT=${OUT:-runs/gpu/fused_inputs} TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
source scripts/gpu/versions.sh
root=${ROOT:-runs/fused-inputs}
recipe=recipes/smollm2-135m/gdn.yaml
mkdir -p "$root"
if [ ! -f "$root/init-pytorch/config.json" ]; then
  plan=$(python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['plan'])" "$recipe")
  python3 -m hybridize convert ${TEACHER:-} --plan "$plan" --out "$root/init-fused" --overwrite 2>&1 | tail -1
  rm -rf "$root/init-pytorch" && cp -r "$root/init-fused" "$root/init-pytorch"
  python3 - "$root/init-pytorch/config.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
config["gdn_fused_inputs"] = False
json.dump(config, open(sys.argv[1], "w"), indent=2)
PY
fi
for micro_batch in "${@:-8}"; do
  for variant in fused pytorch; do
    run=$root/$variant-mb$micro_batch
    rm -rf "$run"
    echo "== gdn_fused_inputs: $variant, micro batch $micro_batch" | tee -a "$OUT/throughput.log"
    python3 scripts/bench_distill.py throughput --recipe "$recipe" --out "$run" --micro-batch "$micro_batch" --steps 15 \
      --set "init=$root/init-$variant" ${TEACHER:+--set "teacher=$TEACHER"} --set plan=null --set recurrent_rope=false \
      --set init_long_heads=0 --set data.source=corpus 2>&1 | tr '\r' '\n' \
      | grep -v "it/s\]\|s/it\]" | sed -n '/^{/,/^}/p' | tee -a "$OUT/throughput.log"
  done
done
