#!/usr/bin/env bash
# Run on the lent GPU: convert the embedded teacher (h2:8), then `hybridize eval` and `hybridize bench` on it.
# Usage (device tool, carrying .whl and, over two calls, the teacher halves): bash scripts/gpu/eval_bench.sh
source scripts/gpu/env.sh
[ -d /root/h2 ] || python3 -m hybridize.cli convert --plan h2:8 --out /root/h2 | tail -3
python3 -m hybridize.cli bench /root/h2 --contexts 1024,8192 --batch-sizes 1,16 --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | grep -v Warn
python3 -m hybridize.cli eval /root/h2 --out "$OUT/eval" 2>&1 | tail -25
