# Sourced by the scripts in this folder: creates $OUT (set by the caller) and writes the GPU and library versions
# to $OUT/versions.txt, so every result folder names the machine it was measured on.
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/versions.txt"
python3 -c "import torch, triton, transformers, accelerate; print('torch', torch.__version__, 'triton',
 triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" \
  | tee -a "$OUT/versions.txt"
python3 -c "import fla; print('fla-core', fla.__version__)" 2>/dev/null | tee -a "$OUT/versions.txt"
