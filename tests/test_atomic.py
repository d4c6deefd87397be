"""Output folders: nothing half-written, no file of the user's deleted, stale staging folders cleaned, umask kept."""

import os
import signal
import socket
import stat
import subprocess
import sys

import pytest

from hybridize.atomic import OUTPUT_RECORD, staged_folder, write_cache_folder, write_json_atomic
from hybridize.errors import UserError


def _write(staging, **files):
    for name, text in files.items():
        (staging / name).write_text(text)


def test_new_folder_appears_whole_with_a_record(tmp_path):
    with staged_folder(tmp_path / "out") as staging:
        _write(staging, a="1", b="2")
        assert not (tmp_path / "out").exists()  # a reader never sees half of it
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [OUTPUT_RECORD, "a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_non_empty_folder_needs_replace_and_keeps_the_users_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty; pass --overwrite"):
        with staged_folder(out, replace=False):
            pass
    with staged_folder(out, replace=True) as staging:
        _write(staging, a="1", stale="old", notes_of_ours="x")
    with staged_folder(out, replace=True) as staging:
        _write(staging, a="2")
    # Ours replaced, our stale file of the earlier run gone, the user's file untouched.
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_RECORD, "a", "notes.txt"]
    assert (out / "a").read_text() == "2" and (out / "notes.txt").read_text() == "mine"
    assert not list(out.glob(".hybridize.partial-*"))


def test_a_users_folder_in_the_way_is_refused_before_anything_moves(tmp_path):
    out = tmp_path / "out"
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "mine.txt").write_text("mine")
    (out / "a").write_text("old")
    with pytest.raises(UserError, match="not written by hybridize"):
        with staged_folder(out, replace=True) as staging:
            _write(staging, a="new")
            (staging / "eval").mkdir()
    assert (out / "eval" / "mine.txt").read_text() == "mine" and (out / "a").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == ["a", "eval"]


def test_the_working_directory_and_its_parent_are_written_into_not_replaced(tmp_path, monkeypatch):
    here = tmp_path / "parent" / "here"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    (here / "notes.txt").write_text("mine")
    with staged_folder(".", replace=True) as staging:
        _write(staging, config="{}")
    with staged_folder("..", replace=True) as staging:
        _write(staging, parent_file="x")
    assert (here / "notes.txt").read_text() == "mine" and (here / "config").is_file()
    assert (here.parent / "parent_file").is_file() and here.is_dir()
    # An earlier output entry that would have to go, but holds the working directory, is refused.
    write_json_atomic(here.parent / OUTPUT_RECORD, {"files": ["here"]})
    with pytest.raises(UserError, match="holds the working directory"):
        with staged_folder("..", replace=True) as staging:
            (staging / "here").mkdir()
    assert (here / "notes.txt").read_text() == "mine"


def test_an_error_inside_leaves_the_target_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_folder(out) as staging:
            _write(staging, a="new")
            raise RuntimeError("failed half-way")
    assert sorted(p.name for p in out.iterdir()) == ["a"] and (out / "a").read_text() == "old"
    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "new") as staging:
            raise RuntimeError("failed half-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with staged_folder(tmp_path / "out") as staging:
            fd = os.open(staging / "private", os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors writes its files
            os.close(fd)
            write_json_atomic(staging / "result.json", {"x": 1})
        write_json_atomic(tmp_path / "alone.json", {"x": 1})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*(tmp_path / "out").iterdir(), tmp_path / "alone.json"]}
    assert modes == {"private": 0o640, "result.json": 0o640, OUTPUT_RECORD: 0o640, "alone.json": 0o640}
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750


WRITER = """
import sys, time
from hybridize.atomic import staged_folder
with staged_folder(sys.argv[1]) as staging:
    (staging / "model.safetensors").write_bytes(b"half")
    print("writing", flush=True)
    time.sleep(600)
"""


def test_partials_of_a_killed_process_are_removed_and_a_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    dead = list(tmp_path.glob(".out.partial-*"))
    assert len(dead) == 1 and f"-{writer.pid}-" in dead[0].name
    live = tmp_path / f".out.partial-{socket.gethostname()}-{os.getpid()}-0123abcd"  # this process: still running
    live.mkdir()
    with staged_folder(out) as staging:
        _write(staging, a="1")
    assert not dead[0].exists() and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]


def test_write_json_atomic_leaves_no_temporary_file(tmp_path):
    write_json_atomic(tmp_path / "r.json", {"a": 1})
    write_json_atomic(tmp_path / "r.json", {"a": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"] and '"a": 2' in (tmp_path / "r.json").read_text()


def test_a_file_named_like_the_output_is_refused(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(UserError, match="is not a folder"):
        with staged_folder(tmp_path / "out"):
            pass
    assert (tmp_path / "out").read_text() == "mine"


def test_a_cache_folder_is_renamed_into_place_whole_and_a_lost_race_keeps_the_winner(tmp_path):
    target = tmp_path / "cache" / "entry"

    def write(folder):
        (folder / "data.txt").write_text("mine")
        (folder / "done").write_text("")

    assert write_cache_folder(target, "done", write) == target
    assert (target / "data.txt").read_text() == "mine" and sorted(p.name for p in target.parent.iterdir()) == ["entry"]
    # a second writer that finished after the first: its rename fails, the first copy stays, its own is removed
    assert write_cache_folder(target, "done", lambda folder: (folder / "data.txt").write_text("late")) == target
    assert (target / "data.txt").read_text() == "mine" and sorted(p.name for p in target.parent.iterdir()) == ["entry"]


@pytest.mark.parametrize("error", [OSError("disk full"), ValueError("cannot serialize"), KeyboardInterrupt()])
def test_a_failed_cache_write_leaves_nothing(tmp_path, error):
    target = tmp_path / "cache" / "entry"

    def fail(folder):
        (folder / "half.txt").write_text("half")
        raise error

    with pytest.raises(type(error)):
        write_cache_folder(target, "done", fail)
    assert list(target.parent.iterdir()) == []
