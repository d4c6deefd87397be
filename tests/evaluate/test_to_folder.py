"""evaluate_to_folder and bench_to_folder called from Python write what `hybridize eval` and `hybridize bench` write."""

import dataclasses
import json

import pytest

from hybridize.cli import main
from hybridize.errors import UserError
from hybridize.evaluate.bench import BenchSettings
from hybridize.evaluate.pipeline import EvalSettings, bench_to_folder, evaluate_to_folder
from hybridize.evaluate.quality import QualitySettings
from hybridize.evaluate.recall import RecallSettings

EVAL_FLAGS = ["--domains", "code", "--seq-len", "32", "--blocks", "1", "--greedy-prompts", "1",
              "--passkey-lengths", "96", "--passkey-depths", "0,1", "--passkey-trials", "1", "--mqar-pairs", "4"]
EVAL_SETTINGS = EvalSettings(
    quality=dataclasses.replace(QualitySettings(), domains=("code",), seq_len=32, blocks_per_domain=1,
                                greedy_prompts=1),
    recall=dataclasses.replace(RecallSettings(), lengths=(96,), depths=(0.0, 1.0), trials=1, mqar_pairs=(4,)))
BENCH_FLAGS = ["--contexts", "24", "--batch-sizes", "1", "--new-tokens", "3", "--repeats", "1",
               "--paths", "hybrid-generate,teacher-generate", "--target", "cache_ratio=1e9"]
BENCH_SETTINGS = BenchSettings(contexts=(24,), batch_sizes=(1,), new_tokens=3, repeats=1,
                               paths=("hybrid generate", "teacher generate"))


def _key_paths(value, prefix: str = "") -> set[str]:
    """Every key of a JSON document, as a path ("quality.domains.code.kl", "rows[0].path")."""
    if isinstance(value, dict):
        return {prefix} | {p for k, v in value.items() for p in _key_paths(v, f"{prefix}.{k}")}
    if isinstance(value, list):
        return {prefix} | {p for i, v in enumerate(value) for p in _key_paths(v, f"{prefix}[{i}]")}
    return {prefix}


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_evaluate_to_folder_writes_what_the_cli_writes(hybrid_dir, teacher_dir, tmp_path, capsys):
    cli_out, lib_out = tmp_path / "cli", tmp_path / "lib"
    assert main(["eval", str(hybrid_dir), "--teacher", str(teacher_dir), "--out", str(cli_out), *EVAL_FLAGS]) == 0
    capsys.readouterr()
    returned = evaluate_to_folder(str(hybrid_dir), lib_out, EVAL_SETTINGS, teacher=str(teacher_dir),
                                  log=lambda *_: None)
    assert capsys.readouterr().out == ""  # every line went to `log`
    assert _files(lib_out) == _files(cli_out) == [".hybridize-output.json", "eval.json", "eval.png", "passkey.png"]
    cli, lib = (json.loads((out / "eval.json").read_text()) for out in (cli_out, lib_out))
    assert lib == json.loads(json.dumps(returned)) and _key_paths(lib) == _key_paths(cli)  # tuples become lists
    # The same settings on the same models: every number but the wall time is the CLI's.
    assert {k: v for k, v in lib.items() if k != "seconds"} == {k: v for k, v in cli.items() if k != "seconds"}


def test_bench_to_folder_writes_what_the_cli_writes(hybrid_dir, tmp_path, capsys):
    cli_out, lib_out = tmp_path / "cli", tmp_path / "lib"
    assert main(["bench", str(hybrid_dir), "--out", str(cli_out), *BENCH_FLAGS]) == 0
    capsys.readouterr()
    returned = bench_to_folder(hybrid_dir, lib_out, BENCH_SETTINGS, targets=[("cache_ratio", 1e9)],
                               log=lambda *_: None)
    assert capsys.readouterr().out == ""
    assert _files(lib_out) == _files(cli_out) == [".hybridize-output.json", "bench.json", "bench.png"]
    cli, lib = (json.loads((out / "bench.json").read_text()) for out in (cli_out, lib_out))
    assert lib == json.loads(json.dumps(returned)) and _key_paths(lib) == _key_paths(cli)  # tuples become lists
    assert lib["settings"] == cli["settings"] and lib["teacher"] == cli["teacher"]
    assert [(r["path"], r["cache_bytes_per_seq"]) for r in lib["rows"]] == \
        [(r["path"], r["cache_bytes_per_seq"]) for r in cli["rows"]]
    assert [t["pass"] for t in lib["targets"]] == [t["pass"] for t in cli["targets"]] == [True]


def test_bad_bench_input_from_python_is_a_user_error_before_any_work(hybrid_dir, tmp_path):
    with pytest.raises(UserError, match="--new-tokens must be at least 2"):
        BenchSettings(new_tokens=1)
    with pytest.raises(UserError, match="unknown bench path 'teacher-turbo'"):
        BenchSettings(paths=("teacher turbo",))
    with pytest.raises(UserError, match="unknown target ratio 'decode_x'"):
        bench_to_folder(hybrid_dir, tmp_path / "bench", BENCH_SETTINGS, targets=[("decode_x", 3.0)])
    assert not (tmp_path / "bench").exists()
