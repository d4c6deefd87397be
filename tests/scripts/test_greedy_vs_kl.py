"""scripts/greedy_vs_kl.py on committed result folders: the rows and their order, skipped folders, bad input."""

import json
import subprocess

from helpers import REPO, run_script

RESULTS = REPO / "docs" / "results"
NOISE = RESULTS / "greedy-at-equal-kl" / "rows.json"


def greedy_vs_kl(*args: str) -> subprocess.CompletedProcess:
    return run_script("greedy_vs_kl.py", *args, timeout=300)


def test_rows_are_each_folders_whole_eval_by_kl_and_folders_without_one_are_skipped(tmp_path):
    out = tmp_path / "chart.png"
    folders = [RESULTS / "gdn", RESULTS / "windows-sinks", RESULTS / "greedy-at-equal-kl"]  # the last: no eval.json
    done = greedy_vs_kl(*map(str, folders), "--noise", str(NOISE), "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["hybrid"] for row in rows] == ["windows-sinks", "gdn"]  # windows-sinks is the closer to the teacher
    for row in rows:
        every = json.loads((RESULTS / row["hybrid"] / "eval.json").read_text())["quality"]["all"]
        assert (row["kl"], row["greedy_exact"], row["top1"]) == (every["kl"], every["greedy_exact"], every["top1"])
    assert out.stat().st_size > 10_000


def test_a_missing_noise_file_is_one_line_and_no_chart(tmp_path):
    out = tmp_path / "chart.png"
    done = greedy_vs_kl(str(RESULTS / "gdn"), "--noise", str(tmp_path / "rows.json"), "--out", str(out))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "rows.json is not a file" in done.stderr
    assert not out.exists()


def test_folders_without_any_eval_are_one_line(tmp_path):
    done = greedy_vs_kl(str(tmp_path), "--noise", str(NOISE), "--out", str(tmp_path / "chart.png"))
    assert done.returncode == 2
    assert done.stderr.strip() == "greedy_vs_kl: none of the folders holds an eval.json"
