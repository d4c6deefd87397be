#!/usr/bin/env bash
# Real Llama shapes through the whole path on one GPU, with random-weight teachers saved in bf16 (sharded, like the
# Hub's): build the teacher, `hybridize convert` it (peak RSS and wall), and per stage name:
#   pipeline SHAPE RECIPE  the shipped recipe, shortened: convert -> stage 1 -> stage 2 -> eval -> bench -> push --dry-run
#   kd SHAPE PLAN MB CKPT  KD-stage tokens/s and peak GPU memory at micro batch MB, gradient checkpointing CKPT (true/false)
#   profile SHAPE PLAN MB CKPT  where the GPU time of those KD steps goes, kernel by kernel
#   convert SHAPE PLAN NAME  conversion alone
# Usage: bash scripts/gpu/real_shapes.sh STAGE ARGS...   (several stages: separate them with `--`)
# Runs on any CUDA machine with hybridize installed (pip install -e .). Disk: the 8B shape needs about 80 GB.
# TOKENIZER: a local tokenizer folder (default: the embedded teacher's); ROOT: where teachers and runs go
# (default runs/real-shapes); OUT: where logs and summary.jsonl go (default ROOT/logs).
set -uo pipefail
export PYTHONUNBUFFERED=1
root=${ROOT:-runs/real-shapes}
OUT=${OUT:-$root/logs}
mkdir -p "$root" "$OUT"
tokenizer=${TOKENIZER:-$(python3 -c "from hybridize.teacher import teacher_folder; print(teacher_folder(None))")}
source scripts/gpu/versions.sh
[ -f "$root/docs.jsonl" ] || python3 scripts/real_shapes.py text --out "$root/docs.jsonl"
summary="$OUT/summary.jsonl"

teacher() {  # teacher SHAPE -> builds $root/SHAPE once
  [ -f "$root/$1/config.json" ] || python3 scripts/real_shapes.py teacher --shape "$1" --out "$root/$1" \
    --tokenizer "$tokenizer" | tee -a "$summary"
}

convert() {  # convert SHAPE PLAN NAME -> $root/NAME, with its peak RSS and wall time in the summary
  teacher "$1"
  [ -f "$root/$3/config.json" ] && return
  local started=$SECONDS
  python3 -m hybridize convert "$root/$1" --plan "$2" --out "$root/$3" 2>&1 | grep -v Warn | tail -8 \
    | tee -a "$OUT/convert.log"
  echo "{\"convert\": \"$3\", \"plan\": \"$2\", \"wall_s\": $((SECONDS - started)), \"log\": \"$(grep -o 'peak RSS [0-9.]* GiB' \
    "$OUT/convert.log" | tail -1)\"}" | tee -a "$summary"
}

quiet() { tr '\r' '\n' | grep -v "it/s\]\|s/it\]\|Warn"; }

pipeline() {  # pipeline SHAPE RECIPE: the recipe at 10 stage-1 and 4 stage-2 steps, then eval, bench and push
  local shape=$1 recipe=$2 name; name=$1-$(basename "$2" .yaml)
  teacher "$shape"
  local run=$root/runs/$name started=$SECONDS
  python3 -m hybridize distill "$recipe" --out "$run" --set "teacher=$root/$shape" \
    --set "data.source=$root/docs.jsonl" --set data.subset=null --set data.max_documents=null \
    --set stages.0.tokens=655360 --set stages.1.tokens=1048576 --set logging.eval_sequences=8 2>&1 | quiet \
    | tail -30 | tee -a "$OUT/$name.log"
  echo "{\"pipeline\": \"$name\", \"distill_wall_s\": $((SECONDS - started))}" | tee -a "$summary"
  python3 - "$run" <<'PY' | tee -a "$summary"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")]
for stage in sorted({r["stage"] for r in rows}):
    train = [r for r in rows if r["stage"] == stage and r["split"] == "train"][2:]
    if train:
        print(json.dumps({"stage": stage, "tokens_per_s_median": sorted(r["tokens_per_s"] for r in train)[len(train) // 2],
                          "peak_memory_gib": max(r.get("peak_memory_gib", 0) for r in train)}))
PY
  started=$SECONDS
  python3 -m hybridize eval "$run/final" --small --out "$run/eval" 2>&1 | quiet | tail -16 | tee -a "$OUT/$name.log"
  python3 -m hybridize bench "$run/final" --small --out "$run/bench" 2>&1 | quiet | tail -12 | tee -a "$OUT/$name.log"
  python3 -m hybridize push "$run/final" my-org/$name --dry-run "$run/push" 2>&1 | tail -3 | tee -a "$OUT/$name.log"
  echo "{\"pipeline\": \"$name\", \"eval_bench_push_wall_s\": $((SECONDS - started)), \"pushed_files\": $(ls "$run/push" | wc -l)}" \
    | tee -a "$summary"
}

kd_bench() {  # kd_bench COMMAND SHAPE PLAN MICRO_BATCH CHECKPOINTING ARGS...: scripts/bench_distill.py COMMAND on the 1B
  # gdn recipe's stage 2 at seq 2048, the teacher and converted hybrid of SHAPE and PLAN (built by `convert`)
  local command=$1 name=$2-$(echo "$3" | tr ':,' '--')
  python3 scripts/bench_distill.py "$command" --recipe recipes/llama3.2-1b/gdn.yaml --seq-len 2048 --micro-batch "$4" \
    --global-batch $(($4 * 4)) --set "teacher=$root/$2" --set "init=$root/$name" --set plan=null \
    --set "data.source=$root/docs.jsonl" --set data.subset=null --set data.max_documents=null \
    --set "stages.0.gradient_checkpointing=$5" "${@:6}"
}

kd() {  # kd SHAPE PLAN MICRO_BATCH CHECKPOINTING: 8 KD steps of the 1B gdn recipe's stage 2 at seq 2048
  local name=$1-$(echo "$2" | tr ':,' '--')
  convert "$1" "$2" "$name"
  local out=$root/kd-$name-mb$3-ckpt$4
  rm -rf "$out"
  kd_bench throughput "$@" --out "$out" --steps 8 --warmup 3 2>&1 | quiet | tail -22 > "$root/kd.log"
  cat "$root/kd.log" >> "$OUT/kd.log"
  sed -n '/^{/,/^}/p' "$root/kd.log" | python3 -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({'kd': '$name',
    'micro_batch': $3, 'checkpointing': '$4', 'tokens_per_s': round(r['tokens_per_s_median']),
    'peak_memory_gib': r['peak_memory_gib_rank0']}))" | tee -a "$summary" || tail -5 "$root/kd.log"
}

profile() {  # profile SHAPE PLAN MICRO_BATCH CHECKPOINTING: the kernel table of 2 such KD steps, after a warm-up run
  local name=$1-$(echo "$2" | tr ':,' '--')
  convert "$1" "$2" "$name"
  rm -rf "$root/profile-$name"
  kd_bench profile "$@" --out "$root/profile-$name" 2>&1 | quiet | tail -50 | tee -a "$OUT/profile.log"
}

stage=()
for arg in "$@" --; do
  if [ "$arg" = "--" ]; then
    [ ${#stage[@]} -gt 0 ] && "${stage[@]}"
    stage=()
  else
    stage+=("$arg")
  fi
done
