#!/usr/bin/env bash
# Where the time goes: the hybrid's fast decode step at 8K / batch 16 (on the converted h2:8 plan), and one stage-2
# KD step of recipes/smollm2-135m/gdn.yaml. Runs on any CUDA machine with hybridize installed.
# Usage: bash scripts/gpu/profile.sh   (OUT: the hybrid, logs and the KD profile; default runs/gpu/profile)
set -uo pipefail
export OUT=${OUT:-runs/gpu/profile} TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
source scripts/gpu/versions.sh
hybrid=$OUT/h2
[ -f "$hybrid/config.json" ] || python3 -m hybridize convert --plan h2:8 --out "$hybrid" | tail -1
python3 scripts/profile_decode.py "$hybrid" --batch 16 --context 8192 2>&1 | grep -v Warn | tee "$OUT/profile_decode.log"
rm -rf "$OUT/kd"
python3 scripts/bench_distill.py profile --out "$OUT/kd" 2>&1 | grep -v "it/s\]" | tail -45 | tee "$OUT/profile_kd.log"
