"""Where eval and bench write (never over a user's files) and how they find the teacher a hybrid was made from."""

import json
import shutil

import pytest

from hybridize.cli import main

QUICK = ["--no-recall", "--domains", "code", "--seq-len", "32", "--blocks", "1", "--greedy-prompts", "1"]
BENCH = ["--contexts", "24", "--batch-sizes", "1", "--new-tokens", "3", "--repeats", "1", "--paths", "hybrid-fast"]


@pytest.mark.parametrize("command, args", [("eval", QUICK), ("bench", BENCH)])
def test_a_users_folder_is_refused_and_overwrite_keeps_their_files(command, args, hybrid_dir, tmp_path, capsys,
                                                                   monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", str(work)):
        assert main([command, str(hybrid_dir), "--out", out, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not empty; pass --overwrite" in err[0]
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    assert main([command, str(hybrid_dir), "--out", ".", "--overwrite", *args]) == 0
    assert (work / "notes.txt").read_text() == "mine" and (work / f"{command}.json").is_file()
    assert (work / f"{command}.png").is_file() and not list(tmp_path.glob(".*partial*"))


def test_the_default_folder_is_refreshed_and_a_users_file_there_kept(hybrid_dir, teacher_dir, tmp_path):
    hybrid = shutil.copytree(hybrid_dir, tmp_path / "hybrid")
    teacher = ["--teacher", str(teacher_dir)]  # the copy's recorded relative path points elsewhere
    assert main(["eval", str(hybrid), *teacher, *QUICK]) == 0
    (hybrid / "eval" / "notes.txt").write_text("mine")
    assert main(["eval", str(hybrid), *teacher, *QUICK]) == 0  # HYBRID/eval is refreshed without --overwrite
    names = {p.name for p in (hybrid / "eval").iterdir()}
    assert {"eval.json", "eval.png", "notes.txt"} <= names and (hybrid / "eval" / "notes.txt").read_text() == "mine"


def test_eval_from_another_directory_finds_a_relative_teacher(teacher_dir, tmp_path, monkeypatch):
    """Converted with the teacher given as a relative path, evaluated from another working directory."""
    monkeypatch.chdir(teacher_dir.parent)
    assert main(["convert", teacher_dir.name, "--plan", "h2:1", "--out", str(tmp_path / "h")]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "h", "--out", "e", *QUICK]) == 0
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["teacher"] == str(teacher_dir.resolve())


def test_a_recorded_teacher_that_is_gone_asks_for_teacher(hybrid_dir, tmp_path, capsys):
    hybrid = shutil.copytree(hybrid_dir, tmp_path / "hybrid")
    record = json.loads((hybrid / "conversion.json").read_text())
    record["teacher"]["name"] = "teachers/tiny-llama"  # relative to a directory this process is not in
    (hybrid / "conversion.json").write_text(json.dumps(record))
    assert main(["eval", str(hybrid), "--out", str(tmp_path / "e"), *QUICK]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "conversion.json" in err[0] and "pass --teacher MODEL" in err[0]
    assert not (tmp_path / "e").exists()
