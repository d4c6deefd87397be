"""scripts/memory_fit.py on a tiny converted window + memory hybrid: a live memory, a zeroed one, and bad input."""

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hybridize.cli import main as hybridize_main
from hybridize.corpus import calibration_batch
from hybridize.teacher import load_teacher, teacher_folder
from helpers import REPO, load_script, run_script

SCRIPT = REPO / "scripts" / "memory_fit.py"


def tiny_teacher(folder: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(teacher_folder(None) / name, folder / name)
    return folder


def test_a_converted_memory_is_live_and_a_zeroed_one_adds_nothing(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher")
    plans = {"g": "full_attention:0 window_gated_deltanet:rest", "s": "full_attention:0 sliding_attention:rest"}
    for name, plan in plans.items():
        assert hybridize_main(["convert", str(teacher), "--plan", plan, "--out", str(tmp_path / name)]) == 0
    done = run_script("memory_fit.py", tmp_path / "g", "--teacher", teacher)
    assert done.returncode == 0, done.stderr[-2000:]
    *rows, means = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["layer"] for row in rows] == [1, 2]
    assert all(row["memory_norm"] > 0 and row["window_memory"] != row["window"] for row in rows)
    assert means["window"] == sum(row["window"] for row in rows) / 2

    # The window branch is the sliding_attention plan's layer, and a memory with a zero output adds nothing.
    script = load_script(SCRIPT)
    hybrid, window_plan = (AutoModelForCausalLM.from_pretrained(tmp_path / name).eval() for name in ("g", "s"))
    for layer in hybrid.model.layers[1:]:
        layer.mixer.memory.o_proj.weight.data.zero_()
    model, tokenizer = load_teacher(str(teacher))
    ids = calibration_batch(tokenizer, seq_len=1024, blocks_per_domain=1)
    for row, (i, window_error) in zip(script.memory_fit(hybrid, model, ids), [(r["layer"], r["window"]) for r in rows]):
        assert row["layer"] == i and row["memory_norm"] == 0 and row["window_memory"] == row["window"]
        assert abs(row["window"] - window_error) < 1e-6
    captured = script.capture_mixer_io(model, ids, [1])
    hidden, target = captured[1]
    with torch.no_grad():
        output = window_plan.model.layers[1].mixer(hidden, script.teacher_forced_context(window_plan, hidden))
    past = slice(window_plan.config.sliding_window, None)
    assert abs(script.relative_error(output[:, past], target[:, past]) - rows[0]["window"]) < 1e-6


def test_a_hybrid_without_window_memory_layers_is_one_line(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher")
    assert hybridize_main(["convert", str(teacher), "--plan", "full_attention:0 gated_deltanet:rest",
                           "--out", str(tmp_path / "g")]) == 0
    done = run_script("memory_fit.py", tmp_path / "g", timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == f"memory_fit: {tmp_path / 'g'} has no window + memory layer"
