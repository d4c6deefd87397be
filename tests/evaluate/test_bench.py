"""The bench measures every path for student and teacher, with exact cache sizes, and the CLI writes its files."""

import json

import pytest

from hybridize.cli import main
from hybridize.evaluate.bench import PATHS, BenchSettings, bench_tables, check_targets, ratios, small_bench

SETTINGS = BenchSettings(contexts=(24, 40), batch_sizes=(1, 2), new_tokens=4, repeats=1)


def test_small_bench_rows_and_cache_sizes(pair):
    student, teacher, tokenizer = pair
    result, table = small_bench(student, teacher, tokenizer, settings=SETTINGS, log=lambda *_: None)
    rows = {(r["path"], r["context"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(p, c, b) for p in PATHS for c in (24, 40) for b in (1, 2)}
    for row in rows.values():  # real numbers even from one timed run on a busy CPU
        assert row["prefill_tok_s"] > 0 and row["ttft_s"] > 0 and row["peak_mem_gib"] is None
        assert row["decode_tok_s"] is not None and row["decode_tok_s"] > 0
    config = teacher.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4  # K+V, fp32
    for context in (24, 40):
        # The static cache holds exactly `context` tokens; the dynamic one all but the last generated token.
        assert rows[("teacher static", context, 2)]["cache_bytes_per_seq"] == per_token * context
        assert rows[("teacher generate", context, 2)]["cache_bytes_per_seq"] == per_token * (context - 1)
        # One of four layers is full attention; sliding (window 512) holds all tokens; two fixed-size states.
        growth = rows[("hybrid generate", 40, 1)]["cache_bytes_per_seq"] - rows[("hybrid generate", 24, 1)][
            "cache_bytes_per_seq"]
        assert growth == per_token // 4 * 2 * 16
    assert {(e["context"], e["batch"]) for e in result["ratios"]} == {(c, b) for c in (24, 40) for b in (1, 2)}
    for e in result["ratios"]:  # cache compared at equal capacity: the two static paths
        key = (e["context"], e["batch"])
        fast, static = rows[("hybrid fast", *key)], rows[("teacher static", *key)]
        assert e["cache_ratio"] == fast["cache_bytes_per_seq"] / static["cache_bytes_per_seq"]
    assert "decode x" in table and "hybrid fast" in table


def test_student_alone_measures_only_hybrid_paths(pair):
    student, _, tokenizer = pair
    result, _ = small_bench(student, None, tokenizer, settings=SETTINGS, log=lambda *_: None)
    assert {r["path"] for r in result["rows"]} == {"hybrid generate", "hybrid fast"}
    assert result["ratios"] == [] and "targets" not in result
    assert [t["pass"] for t in check_targets(result["ratios"], [("decode_speedup", 1.0)])] == [False]


def test_targets_check_each_measured_point_in_its_direction():
    rows = [{"path": p, "context": 8192, "batch": 16, "decode_tok_s": speed, "prefill_tok_s": 1.0, "ttft_s": 1.0,
             "peak_mem_gib": None, "cache_bytes_per_seq": cache}
            for p, speed, cache in (("hybrid fast", 3100.0, 25.0), ("hybrid generate", 100.0, 24.0),
                                    ("teacher static", 1000.0, 100.0), ("teacher generate", 400.0, 99.0))]
    targets = [("decode_speedup", 3.0), ("cache_ratio", 0.30), ("peak_mem_ratio", 0.5)]
    checked = check_targets(ratios(rows), targets)
    assert [(t["ratio"], t["context"], t["batch"]) for t in checked] == [(name, 8192, 16) for name, _ in targets]
    decode, cache, peak = checked
    assert decode["measured"] == pytest.approx(3.1) and decode["pass"]  # a speed-up: at least the target
    assert cache["measured"] == 0.25 and cache["pass"]  # a share of the teacher's: at most the target
    assert peak["measured"] is None and not peak["pass"]  # not measured on the CPU: never a pass
    rows[0]["decode_tok_s"] = 2900.0
    assert not check_targets(ratios(rows), [("decode_speedup", 3.0)])[0]["pass"]
    lines = bench_tables({"rows": [], "ratios": [], "targets": checked}).splitlines()
    assert "target decode_speedup >= 3 at 8192 ctx, batch 16: 3.100 PASS" in lines
    assert "target peak_mem_ratio <= 0.5 at 8192 ctx, batch 16: not measured FAIL" in lines


def test_bench_cli_writes_json_and_png(hybrid_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", str(hybrid_dir), "--out", str(out), "--contexts", "24", "--batch-sizes", "1",
                 "--new-tokens", "3", "--repeats", "1", "--paths", "hybrid fast,teacher static"])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    assert {r["path"] for r in result["rows"]} == {"hybrid fast", "teacher static"}
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "hybrid / teacher" in capsys.readouterr().out and "targets" not in result


def test_bench_cli_target_prints_pass_or_fail_and_sets_the_exit_code(hybrid_dir, tmp_path, capsys):
    args = ["bench", str(hybrid_dir), "--contexts", "24", "--batch-sizes", "1", "--new-tokens", "3", "--repeats", "1",
            "--paths", "hybrid-generate,teacher-generate"]
    assert main(args + ["--out", str(tmp_path / "met"), "--target", "cache_ratio=1e9"]) == 0
    assert "target cache_ratio <= 1e+09 at 24 ctx, batch 1:" in capsys.readouterr().out
    assert main(args + ["--out", str(tmp_path / "missed"), "--target", "decode_speedup=1e9"]) == 1
    assert "FAIL" in capsys.readouterr().out
    targets = json.loads((tmp_path / "missed" / "bench.json").read_text())["targets"]
    assert [(t["ratio"], t["target"], t["pass"]) for t in targets] == [("decode_speedup", 1e9, False)]


def test_bench_cli_rejects_bad_settings(hybrid_dir, capsys):
    assert main(["bench", str(hybrid_dir), "--paths", "teacher turbo"]) == 2
    assert main(["bench", str(hybrid_dir), "--contexts", "16", "--new-tokens", "16"]) == 2
    assert main(["bench", str(hybrid_dir), "--target", "decode_x=3"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("hybridize bench: error:") for e in errors)
    assert "unknown ratio 'decode_x'" in errors[2]
    assert "allowed: hybrid-generate,hybrid-fast,teacher-generate,teacher-static" in errors[0]


def test_bench_paths_are_written_without_spaces(hybrid_dir, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", str(hybrid_dir), "--out", str(out), "--contexts", "24", "--batch-sizes", "1",
                 "--new-tokens", "3", "--repeats", "1", "--paths", "hybrid-generate,teacher-generate"]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["path"] for r in rows] == ["hybrid generate", "teacher generate"]
    assert all(r["decode_tok_s"] > 0 for r in rows)
