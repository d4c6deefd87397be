"""scripts/readout_sensitivity.py on a tiny teacher: an all-attention plan keeps the whole readout at KL 0, a replaced
readout layer adds nothing, and replacing one layer leaves the layers below it exactly the teacher's."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hybridize.teacher import teacher_folder
from helpers import REPO, load_script, run_script, save_tiny_teacher

LAYERS = 3


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(teacher_folder(None))
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny-llama", tokenizer, LAYERS, max_positions=512)


def run(teacher_dir, out: Path, *args: str) -> dict:
    # threshold 0: every layer of the random teacher counts as a readout layer
    done = run_script("readout_sensitivity.py", *args, "--teacher", teacher_dir, "--length", 200, "--threshold", 0,
                      "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_plans_all_attention_keeps_everything_and_a_replaced_readout_layer_adds_nothing(teacher_dir, tmp_path):
    record = run(teacher_dir, tmp_path / "plans.json", "plans", "all:full_attention",
                 "full_attention:0,1 gated_deltanet:2")
    assert record["readout_layers"] == list(range(LAYERS))
    same, replaced = record["rows"]["all:full_attention"], record["rows"]["full_attention:0,1 gated_deltanet:2"]
    assert same["kl_teacher_hybrid"] == pytest.approx(0, abs=1e-6)
    assert same["readout_share"] == pytest.approx(1, abs=1e-3)  # rounded to 4 places
    assert replaced["by_layer"]["2"] == 0
    assert replaced["kl_teacher_hybrid"] > 1e-4


def test_layers_leave_the_layers_below_the_replaced_one_as_the_teachers(teacher_dir, tmp_path):
    record = run(teacher_dir, tmp_path / "layers.json", "layers", "--mixer", "mamba2")
    teacher = record["teacher"]
    assert sorted(record["rows"], key=int) == [str(i) for i in range(LAYERS)]
    for i, row in record["rows"].items():
        assert row["by_layer"][i] == 0
        for below in range(int(i)):  # depth is causal: a layer's replacement cannot change what comes before it
            assert row["by_layer"][str(below)] == pytest.approx(teacher[str(below)], abs=1e-4)


def test_recurrent_rope_reaches_the_hybrids(teacher_dir):
    script = load_script(REPO / "scripts" / "readout_sensitivity.py")
    plan = ["full_attention", "gated_deltanet", "mamba2"]
    for rope in (False, True):
        hybrid = script.Converter(str(teacher_dir), 200, 0.0, recurrent_rope=rope).hybrid(plan)
        assert hybrid.config.recurrent_rope is rope
        assert all(layer.mixer.rope is rope for layer in hybrid.model.layers[1:])
