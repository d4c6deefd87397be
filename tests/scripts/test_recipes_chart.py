"""scripts/recipes_chart.py on the committed recipe result folders: the rows, the folders left off, bad input."""

import json
import subprocess

from helpers import REPO, run_script

RESULTS = REPO / "docs" / "results"


def chart(*args: str) -> subprocess.CompletedProcess:
    return run_script("recipes_chart.py", *args, timeout=300)


def test_rows_come_from_each_folders_eval_and_bench_and_unbenched_folders_are_left_off(tmp_path):
    out = tmp_path / "recipes.png"
    done = chart(f"{RESULTS / 'headline-s4-12m'}=windows-sinks", str(RESULTS / "window-gdn"), str(RESULTS / "gdn"),
                 "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["recipe"] for row in rows] == ["windows-sinks", "window-gdn"]
    for row, folder in zip(rows, ["headline-s4-12m", "window-gdn"]):
        results = json.loads((RESULTS / folder / "eval.json").read_text())
        bench = json.loads((RESULTS / folder / "bench.json").read_text())
        assert row["kl"] == results["quality"]["all"]["kl"]
        assert row["decode_speedup"] == next(r["decode_speedup"] for r in bench["ratios"]
                                             if (r["context"], r["batch"]) == (8192, 16))
        assert row["ppl_ratio_worst"] == max(d["student_ppl"] / d["teacher_ppl"]
                                             for d in results["quality"]["domains"].values())
    assert "gdn: no bench at 8192 context, batch 16; left off the chart" in done.stderr
    assert out.stat().st_size > 10_000


def test_a_folder_without_eval_results_is_one_line_and_no_chart(tmp_path):
    out = tmp_path / "recipes.png"
    done = chart(str(tmp_path), "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.strip() == f"recipes_chart: {tmp_path} holds no eval.json"
    assert not out.exists()
