#!/usr/bin/env bash
# Run on the lent GPU: kernel correctness against the fp32 references, then the kernel benchmarks vs fla-core.
# Usage (device tool, carrying .whl with fla-core and gguf wheels): bash scripts/gpu_kernels.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/versions.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/versions.txt"
python3 -m pytest tests/kernels tests/model/test_kernels_in_model.py -k cuda -q -p no:cacheprovider 2>&1 | tee "$OUT/kernel_tests.log" | tail -40
for bench in scripts/bench_gated_delta.py scripts/bench_ssd.py scripts/bench_conv_norm.py; do
  echo "== $bench"; timeout 200 python3 "$bench" 2>&1 | tee -a "$OUT/bench.log" | tail -60
done
