"""scripts/study.py report on the study's committed eval results: the rows, the question panels, the Pareto front."""

import json
import shutil
from pathlib import Path

from helpers import REPO, load_script, run_script

COMMITTED = REPO / "docs" / "results" / "study"


def load_study():
    return load_script(REPO / "scripts" / "study.py")


def report(root: Path) -> list[dict]:
    done = run_script("study.py", "report", "--root", root, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((root / "study.json").read_text())


def test_report_rows_and_question_panels_from_real_eval_results(tmp_path):
    root = tmp_path / "study"
    shutil.copytree(COMMITTED, root, ignore=shutil.ignore_patterns("*.png", "study.json"))
    rows = report(root)
    names = sorted(path.name for path in root.iterdir() if (path / "eval" / "eval.json").exists())
    assert sorted(row["run"] for row in rows) == names and len(names) >= 8
    for row in rows:
        domains = json.loads((root / row["run"] / "eval" / "eval.json").read_text())["quality"]["domains"]
        assert row["ppl_ratio_docs"] == domains["docs"]["student_ppl"] / domains["docs"]["teacher_ppl"]
        bench = root / row["run"] / "bench" / "bench.json"
        assert ("decode_tok_s" in row) == bench.exists()  # speed only for the runs benched at 8K, batch 16
    assert (root / "questions.png").stat().st_size > 10_000
    assert (root / "pareto.png").exists() == any("decode_tok_s" in row for row in rows)
    assert {row["run"]: row["sinks"] for row in rows}.get("sinks-planF-s4") == 4


def test_benched_runs_get_their_fast_decode_speed_and_a_pareto_plot(tmp_path):
    root = tmp_path / "study"
    shutil.copytree(COMMITTED / "mixers-MGS", root / "attention-k5")
    shutil.copytree(COMMITTED / "mixers-SGM", root / "attention-k2")
    rows_of = lambda tok_s: [  # noqa: E731 - bench.json rows: 8K at batch 16, another batch, another path
        {"path": "hybrid fast", "context": 8192, "batch": 16, "decode_tok_s": tok_s, "cache_bytes_per_seq": 7},
        {"path": "hybrid fast", "context": 8192, "batch": 1, "decode_tok_s": 1.0, "cache_bytes_per_seq": 7},
        {"path": "teacher static", "context": 8192, "batch": 16, "decode_tok_s": 2.0, "cache_bytes_per_seq": 9}]
    for name, tok_s in (("attention-k5", 9000.0), ("attention-k2", 12000.0)):
        (root / name / "bench").mkdir()
        (root / name / "bench" / "bench.json").write_text(json.dumps({"rows": rows_of(tok_s)}))
    rows = {row["run"]: row for row in report(root)}
    assert rows["attention-k5"]["decode_tok_s"] == 9000.0 and rows["attention-k2"]["decode_tok_s"] == 12000.0
    assert rows["attention-k5"]["kept"] == 5 and rows["attention-k2"]["kept"] == 2
    assert (root / "pareto.png").stat().st_size > 10_000


def test_pareto_front_keeps_only_unbeaten_points_by_speed():
    front = load_study().pareto_front
    # (speed, kl): 1 is beaten by 0 (slower and worse), 3 by 2 (as fast, worse); 4 equals 2 and beats nothing
    points = [(10.0, 0.1), (5.0, 0.2), (20.0, 0.3), (20.0, 0.4), (20.0, 0.3), (30.0, 0.9)]
    assert front(points) == [0, 2, 4, 5]
    assert front([(1.0, 1.0)]) == [0]


def test_the_recall_runs_are_the_gdn_recipe_with_one_lever_each():
    """Each recall run's settings bind to the shipped recipe (a renamed key would fail here, not on the GPU)."""
    from hybridize.distill.recipe import CopiedSpans, parse_recipe, read_recipe

    study = load_study()
    recall = [run for run in study.runs() if run.question == "recall"]
    assert len({run.name for run in study.runs()}) == len(study.runs())
    recipes = {run.name: parse_recipe(read_recipe(REPO / study.RECIPES / f"{run.stages}.yaml",
                                                  study.distill_settings(run))) for run in recall}
    base = recipes["recall-gdn"]
    assert base.plan == "full_attention:0,1,2,8,18,20,23,24 gated_deltanet:rest" and base.init_long_heads == 0
    assert [s.half_life_lr for s in base.stages] == [None, None]
    assert recipes["recall-gdn-long-heads"].init_long_heads == 0.25
    assert not recipes["recall-gdn-long-heads"].recurrent_rope
    assert [s.half_life_lr for s in recipes["recall-gdn-half-life-lr"].stages] == [1e-2, 3e-3]
    both = recipes["recall-gdn-long-heads-half-life-lr"]
    assert both.init_long_heads == 0.25 and [s.half_life_lr for s in both.stages] == [1e-2, 3e-3]
    assert recipes["recall-gdn-readout-layers"].plan == "full_attention:0,1,2,7,16,18,20,21 gated_deltanet:rest"
    assert recipes["recall-gdn-rope"].recurrent_rope and not base.recurrent_rope
    combined = recipes["recall-gdn-rope-long-heads"]
    assert combined.recurrent_rope and combined.init_long_heads == 0.25
    shares = recipes["recall-gdn-rope-long-heads-shares"]
    assert shares.data.part_shares == {"code": 0.6, "docs": 0.2, "prose": 0.2} and not combined.data.part_shares
    assert shares.recurrent_rope and shares.init_long_heads == 0.25
    uncalibrated = recipes["recall-gdn-rope-uncalibrated"]
    assert (uncalibrated.init_gate, uncalibrated.init_decay, uncalibrated.init_beta) == ("zero", "slow", "half")
    assert uncalibrated.recurrent_rope and uncalibrated.init_long_heads == 0 and combined.init_gate == "teacher"
    copies = recipes["recall-gdn-rope-long-heads-copies"]
    assert copies.stages[1].copied_spans == CopiedSpans(share=0.25, tokens=32, min_gap=1024)
    assert copies.stages[0].copied_spans is None and combined.stages[1].copied_spans is None
    assert {sum(s.tokens for s in r.stages) for r in recipes.values()} == {80_000_000}  # equal tokens
