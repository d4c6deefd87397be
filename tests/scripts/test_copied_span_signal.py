"""scripts/copied_span_signal.py on a tiny teacher: within the window the all-window copy is the teacher (KL 0 with
or without a span), past it the window misses part of the teacher, and a student that is the teacher misses
nothing."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hybridize.teacher import teacher_folder
from helpers import run_script, save_tiny_teacher



@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(teacher_folder(None))
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny-llama", tokenizer, 2, max_positions=2048)


def signal(teacher_dir, out: Path, seq_len: int, min_gap: int, *more: str) -> dict:
    done = run_script("copied_span_signal.py", "--teacher", teacher_dir, "--seq-len", seq_len, "--tokens", 8,
                      "--min-gap", min_gap, "--blocks", 1, "--out", out, *more)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())["domains"]


def test_inside_the_window_nothing_is_missed_and_past_it_something_is(teacher_dir, tmp_path):
    inside = signal(teacher_dir, tmp_path / "inside.json", seq_len=500, min_gap=200)  # 500 <= 512 + 4 sinks
    assert set(inside) == {"code", "docs", "prose"}
    for row in inside.values():
        assert all(value == pytest.approx(0, abs=1e-6) for value in row.values()), row
    # fp32 rounding alone stays orders below 1e-6 nats (the inside case above); the random teacher's attention
    # past the window, spread over ~1K tokens, carries about 1e-4
    past = signal(teacher_dir, tmp_path / "past.json", seq_len=1100, min_gap=700)
    for row in past.values():
        assert row["kl_block_as_read"] > 1e-6 and row["kl_copy_positions_copied"] > 1e-6, row
    itself = signal(teacher_dir, tmp_path / "itself.json", 1100, 700, "--student", str(teacher_dir))
    for row in itself.values():
        assert all(value == pytest.approx(0, abs=1e-6) for value in row.values()), row
