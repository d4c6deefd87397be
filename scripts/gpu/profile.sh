#!/usr/bin/env bash
# Run on the lent GPU (teacher joined): where the time goes in the two paths that miss their bars — the hybrid's
# fast decode step at 8K / batch 16, and one stage-2 KD step of the SmolLM2 recipe. Usage: bash scripts/gpu/profile.sh
source scripts/gpu/env.sh
[ -d /root/h2 ] || python3 -m hybridize.cli convert --plan h2:8 --out /root/h2 | tail -1
timeout 150 python3 scripts/profile_decode.py /root/h2 --batch 16 --context 8192 2>&1 | grep -v Warn | tee "$OUT/profile_decode.log"
timeout 200 python3 scripts/bench_distill.py profile --out /root/profile-kd 2>&1 | grep -v "it/s\]" | tail -45 | tee "$OUT/profile_kd.log"
