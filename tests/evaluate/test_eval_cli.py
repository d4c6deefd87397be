"""`hybridize eval` end to end on tiny models, its errors, and lm-eval tasks from a local task file, offline."""

import importlib.util
import json
import sys

import pytest
import torch

from hybridize.cli import main
from hybridize.evaluate.lm_eval_tasks import INSTALL_HINT, lm_eval_table, run_lm_eval

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["--seq-len", "48", "--blocks", "1", "--greedy-prompts", "1", "--passkey-lengths", "96",
         "--passkey-depths", "0,1", "--passkey-trials", "1", "--mqar-pairs", "4"]
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


def test_eval_writes_json_and_pngs(hybrid_dir, teacher_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", str(hybrid_dir), "--teacher", str(teacher_dir), "--out", str(out), *SMALL]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["teacher"] == str(teacher_dir)
    assert set(results["quality"]["domains"]) == {"code", "docs", "prose"}
    assert results["recall"]["passkey"]["lengths"] == [96]
    for png in ("eval.png", "passkey.png"):
        assert (out / png).read_bytes()[:8] == PNG
    printed = capsys.readouterr().out
    assert "ppl hybrid" in printed and "passkey @96" in printed and "wrote" in printed


def test_eval_defaults_to_the_recorded_teacher_and_can_skip_it(hybrid_dir, teacher_dir, tmp_path):
    out = tmp_path / "alone"
    assert main(["eval", str(hybrid_dir), "--teacher", "none", "--out", str(out), "--no-recall", *SMALL[:6]]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["teacher"] is None and "kl" not in results["quality"]["all"]
    assert main(["eval", str(hybrid_dir), "--out", str(out), "--overwrite", "--no-recall", *SMALL[:6]]) == 0
    assert json.loads((out / "eval.json").read_text())["teacher"] == str(teacher_dir)


def test_eval_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a model folder" in err[0]
    assert not out.exists()


def test_a_missing_gpu_is_one_line(hybrid_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", str(hybrid_dir), "--out", str(out), "--device", "cuda:99", *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"hybridize eval: error: --device cuda:99: this machine has {torch.cuda.device_count()} CUDA GPU(s)"]
    assert not out.exists()


def test_tasks_without_lm_eval_is_a_clear_error(hybrid_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the extra looks like to find_spec
    assert main(["eval", str(hybrid_dir), "--out", str(tmp_path / "e"), "--no-recall", *SMALL[:6],
                 "--tasks", "hellaswag"]) == 2
    assert capsys.readouterr().err.strip() == f"hybridize eval: error: {INSTALL_HINT}"


@pytest.fixture
def local_task(tmp_path):
    """A 4-question multiple-choice task whose data is a local JSON-lines file: no network needed."""
    data = tmp_path / "tiny_choice.jsonl"
    rows = [("The capital of France is", [" Paris", " Rome", " Oslo"], 0),
            ("Two plus two equals", [" three", " four", " five"], 1),
            ("The sky on a clear day is", [" green", " red", " blue"], 2),
            ("Water freezes at zero degrees", [" Celsius", " Kelvin", " pounds"], 0)]
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in rows))
    task = tmp_path / "tiny_choice.yaml"
    task.write_text(
        "task: tiny_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return task


@pytest.mark.skipif(not HAS_LM_EVAL, reason="needs lm_eval (in the dev extra)")
def test_lm_eval_local_task_offline(pair, local_task, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    student, teacher, tokenizer = pair
    results = run_lm_eval({"student": student, "teacher": teacher}, tokenizer, [str(local_task)], batch_size=2)
    for name in ("student", "teacher"):
        accuracy = results[name]["tiny_choice"]["acc,none"]
        assert accuracy in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 questions
    assert "tiny_choice" in lm_eval_table(results)


@pytest.mark.skipif(not HAS_LM_EVAL, reason="needs lm_eval (in the dev extra)")
def test_eval_cli_runs_a_local_task(identity_dir, local_task, tmp_path, monkeypatch):
    """Through the CLI; with the identity hybrid both models must score exactly the same."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "eval"
    assert main(["eval", str(identity_dir), "--out", str(out), "--no-recall", *SMALL[:6],
                 "--tasks", str(local_task)]) == 0
    lm_eval = json.loads((out / "eval.json").read_text())["lm_eval"]
    assert lm_eval["student"]["tiny_choice"] == lm_eval["teacher"]["tiny_choice"]
