#!/usr/bin/env bash
# Convert the embedded teacher with the h2:8 plan, then `hybridize bench` and `hybridize eval` on the (untrained)
# hybrid: speed and cache do not depend on the weights. Runs on any CUDA machine with hybridize installed.
# Usage: bash scripts/gpu/eval_bench.sh   (OUT: the hybrid, bench/ and eval/; default runs/gpu/eval_bench)
set -uo pipefail
export OUT=${OUT:-runs/gpu/eval_bench} TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
source scripts/gpu/versions.sh
hybrid=$OUT/h2
[ -f "$hybrid/config.json" ] || python3 -m hybridize convert --plan h2:8 --out "$hybrid" | tail -3
python3 -m hybridize bench "$hybrid" --contexts 1024,8192 --batch-sizes 1,16 --out "$OUT/bench" --overwrite 2>&1 \
  | tee "$OUT/bench.log" | grep -v Warn
python3 -m hybridize eval "$hybrid" --out "$OUT/eval" --overwrite 2>&1 | tail -25
