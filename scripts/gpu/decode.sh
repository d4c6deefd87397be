#!/usr/bin/env bash
# The fast decode path on the GPU: its CUDA tests (the captured and compiled step against eager and generate(), the
# layer steps, RoPE and slot writes, the decode attention kernel, the windows' flex attention), then the
# constant-memory plan's bench at 8K / batch 16 against the teacher's static-cache path and the kernel table of its
# step (docs/benchmarks.md, "Hybrid against teacher"). The plan is converted from a random-weight teacher of
# SmolLM2's config saved in bf16: decode speed depends on the shapes, not on the weights' values. Runs on any CUDA
# machine with hybridize installed.
# Usage: bash scripts/gpu/decode.sh   (OUT: logs, the bench and versions.txt; default runs/gpu/decode;
# ROOT: the teacher and the converted plan, default runs/decode; TOKENIZER: a local tokenizer folder, default the
# embedded teacher's; TEST_LIMIT: seconds for the tests, default 900)
set -uo pipefail
export OUT=${OUT:-runs/gpu/decode} TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
source scripts/gpu/versions.sh
root=${ROOT:-runs/decode}
tokenizer=${TOKENIZER:-$(python3 -c "from hybridize.teacher import teacher_folder; print(teacher_folder(None))")}
# -rfE with --tb=short puts every failure's message in the log, also when the limit stops the run part-way.
timeout "${TEST_LIMIT:-900}" python3 -m pytest tests/evaluate/test_fast_decode.py tests/kernels/test_layer_steps.py \
  tests/kernels/test_rope_store.py tests/kernels/test_decode_attention.py tests/model/test_sliding_window_attention.py \
  -k "cuda and not every_config" -v -p no:cacheprovider -rfE --tb=short > "$OUT/cuda_tests.log" 2>&1
echo "pytest rc $?" >> "$OUT/cuda_tests.log"
grep -E "^(FAILED|ERROR)|pytest rc| passed| failed" "$OUT/cuda_tests.log" | tail -20
[ -f "$root/teacher/config.json" ] || python3 scripts/real_shapes.py teacher --shape smollm2-135m \
  --out "$root/teacher" --tokenizer "$tokenizer" | tail -1
[ -f "$root/constant-memory/config.json" ] || python3 -m hybridize convert "$root/teacher" \
  --plan all:window_gated_deltanet --sink-tokens 4 --out "$root/constant-memory" 2>&1 | tail -1
python3 -m hybridize bench "$root/constant-memory" --contexts 8192 --batch-sizes 16 --paths hybrid-fast,teacher-static \
  --out "$OUT/bench" --overwrite 2>&1 | grep -v Warn | tail -10
python3 scripts/profile_decode.py "$root/constant-memory" --batch 16 --context 8192 --steps 64 \
  --layer-types window_gated_deltanet,sliding_attention,gated_deltanet 2>&1 | grep -v Warn | tee "$OUT/profile.log" \
  | tail -40
