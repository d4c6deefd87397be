"""`hybridize convert` end to end on a tiny local Llama: output folder, report, determinism, and every bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import hybridize.convert.pipeline as convert_io
from hybridize.cli import main
from hybridize.evaluate.common import recorded_teacher
from hybridize.teacher import teacher_folder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def save_tiny(folder, model_class, config_class, **extra):
    torch.manual_seed(0)
    config = config_class(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                          eos_token_id=2, bos_token_id=1, **extra)
    model_class(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:  # the real SmolLM2 tokenizer, so calibration text tokenizes as in practice
        shutil.copy(teacher_folder(None) / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("teacher"), LlamaForCausalLM, LlamaConfig)


def convert(capsys, *args):
    capsys.readouterr()  # drop what the test's own setup printed
    code = main(["convert", *map(str, args)])
    return code, capsys.readouterr()


def test_convert_writes_a_self_contained_deterministic_folder(tiny_llama, tmp_path, capsys):
    code, out = convert(capsys, tiny_llama, "--plan", "h2:1", "--out", tmp_path / "a")
    assert code == 0
    assert "plan:" in out.out and "KL(teacher||hybrid)" in out.out
    record = json.loads((tmp_path / "a" / "conversion.json").read_text())
    assert record["layer_types"] == ["mamba2", "gated_deltanet", "full_attention", "sliding_attention"]
    assert record["seed"] == 0 and record["hybridize_version"]
    assert record["teacher"]["files"]["model.safetensors"]  # weight hash
    assert [row["layer"] for row in record["report"]["layers"]] == [0, 1, 3]
    assert record["report"]["layers"][2]["relative_error"] < 1.0  # SWA copies attention: close at step 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "a" / name).exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert model.config.layer_types == record["layer_types"]
    assert convert(capsys, tiny_llama, "--plan", "h2:1", "--out", tmp_path / "b")[0] == 0
    for name in ("model.safetensors", "config.json", "conversion.json"):  # no measurements in the record
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_all_attention_plan_reproduces_teacher_logits(tiny_llama, tmp_path, capsys):
    assert convert(capsys, tiny_llama, "--plan", "all:full_attention", "--out", tmp_path / "h")[0] == 0
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama)
    hybrid = AutoModelForCausalLM.from_pretrained(tmp_path / "h")
    ids = torch.randint(0, 49152, (2, 50))
    with torch.no_grad():
        assert (teacher(ids).logits - hybrid(ids, use_cache=False).logits).abs().max() <= 1e-4


def test_sink_tokens_reach_the_saved_config_and_the_forward(tiny_llama, tmp_path, capsys):
    """--sink-tokens 2 on a plan of windows: the saved hybrid keeps 2 sinks; past the window its logits differ from
    plain windows', and with the window covering the whole sequence they are the teacher's."""
    plan = "full_attention:0 sliding_attention:rest"
    assert convert(capsys, tiny_llama, "--plan", plan, "--sink-tokens", 2, "--out", tmp_path / "s")[0] == 0
    assert convert(capsys, tiny_llama, "--plan", plan, "--out", tmp_path / "p")[0] == 0
    sinks, plain = (AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in ("s", "p"))
    assert sinks.config.sliding_window_sinks == 2 and plain.config.sliding_window_sinks == 0
    assert json.loads((tmp_path / "s" / "conversion.json").read_text())["sink_tokens"] == 2
    window = sinks.config.sliding_window
    ids = torch.randint(0, 49152, (1, window + 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        within = ids[:, :window]
        assert torch.equal(sinks(within, use_cache=False).logits, plain(within, use_cache=False).logits)
        assert (sinks(ids, use_cache=False).logits[0, window:] - plain(ids, use_cache=False).logits[0, window:]
                ).abs().max() > 1e-3


def converted_with_and_without(capsys, teacher, tmp_path, plan: str, flag: str, *options: str) -> list:
    """The plan converted with the boolean `flag` and without it (both with `options`); the option must reach the
    saved config and conversion.json under its own name."""
    key = flag.removeprefix("--").replace("-", "_")
    for name, extra in (("with", [flag]), ("without", [])):
        assert convert(capsys, teacher, "--plan", plan, *extra, *options, "--out", tmp_path / name)[0] == 0
    models = [AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in ("with", "without")]
    assert getattr(models[0].config, key) and not getattr(models[1].config, key)
    assert json.loads((tmp_path / "with" / "conversion.json").read_text())[key] is True
    return models


def test_recurrent_rope_reaches_the_saved_config_and_the_forward(tiny_llama, tmp_path, capsys):
    """--recurrent-rope: the saved hybrid's config and conversion.json say so, and its recurrent layers rotate (their
    logits differ from the same conversion without the option from the second token on). The gates start open
    (teacher), since layers that start as exact skips give the same logits whether they rotate or not."""
    rotated, plain = converted_with_and_without(capsys, tiny_llama, tmp_path,
                                                "full_attention:0 gated_deltanet:1 mamba2:rest", "--recurrent-rope",
                                                "--init-gate", "teacher")
    ids = torch.randint(0, 49152, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rotated_logits, plain_logits = (m(ids, use_cache=False).logits[0] for m in (rotated, plain))
    assert (rotated_logits[1:] - plain_logits[1:]).abs().max() > 1e-3


def test_memory_outside_window_reaches_the_saved_config_and_what_the_memory_reads(tiny_llama, tmp_path, capsys):
    """--memory-outside-window: config and conversion.json say so; with the memories opened (memory_scale 1), a
    40-token input (inside the 512-token window) gives the outside-window memories nothing to read, so the logits
    stay the window's, while the default memories change them. A plan without window + memory layers refuses it."""
    outside, default = converted_with_and_without(capsys, tiny_llama, tmp_path,
                                                  "full_attention:0 window_gated_deltanet:1 window_mamba2:rest",
                                                  "--memory-outside-window")
    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        closed = {name: model(ids, use_cache=False).logits for name, model in (("o", outside), ("d", default))}
        for model in (outside, default):
            for layer in model.model.layers[1:]:
                layer.mixer.memory_scale.fill_(1.0)
        assert torch.equal(outside(ids, use_cache=False).logits, closed["o"])
        assert (default(ids, use_cache=False).logits - closed["d"]).abs().max() > 1e-3
    code, refused = convert(capsys, tiny_llama, "--plan", "full_attention:0 gated_deltanet:rest",
                            "--memory-outside-window", "--out", tmp_path / "n")
    assert code == 2 and not (tmp_path / "n").exists()
    assert refused.err.strip() == ("hybridize convert: error: memory_outside_window (convert --memory-outside-window) "
                                   "applies to window_gated_deltanet and window_mamba2 layers, and the plan has none")


def corrupt_copy(tiny_llama, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    return folder


@pytest.mark.parametrize(
    "case, message",
    [
        ("mistral", "teacher architecture 'mistral' is not supported; supported: llama"),
        ("plan_length", "plan has 3 layers but the model has 4"),
        ("unknown_type", "unknown layer type 'lstm'"),
        ("exists", "is not empty; pass --overwrite"),
        ("corrupt", "is unreadable or corrupt"),
        ("hub_offline", "not in the Hugging Face cache, and the Hub cannot be reached"),
        ("negative_sinks", "--sink-tokens must be >= 0, got -1"),
        ("negative_align", "--align-steps must be >= 0, got -1"),
        ("long_heads_without_teacher_decay", "long_memory_heads applies to decay='teacher'"),
    ],
)
def test_bad_input_gets_one_line_exit_2_and_no_output(case, message, tiny_llama, tmp_path, capsys):
    teacher, plan, out = tiny_llama, "h2:1", tmp_path / "out"
    if case == "mistral":
        teacher = save_tiny(tmp_path / "mistral", MistralForCausalLM, MistralConfig)
    elif case == "plan_length":
        plan = str(tmp_path / "plan.json")
        (tmp_path / "plan.json").write_text(json.dumps({"layer_types": ["mamba2"] * 3}))
    elif case == "unknown_type":
        plan = "lstm:rest"
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "corrupt":
        teacher = corrupt_copy(tiny_llama, tmp_path)
    elif case == "hub_offline":
        teacher = "no-such-org/no-such-model"
    extra = {"negative_sinks": ["--sink-tokens", -1], "negative_align": ["--align-steps", -1],
             "long_heads_without_teacher_decay": ["--init-long-heads", 0.25, "--init-decay", "slow"]}.get(case, [])
    code, captured = convert(capsys, teacher, "--plan", plan, "--out", out, *extra)
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in captured.err
    if case == "exists":
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_interrupted_conversion_leaves_nothing_behind(tiny_llama, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_io.json, "dumps", interrupted)  # dies after the weights were written
    code, captured = convert(capsys, tiny_llama, "--plan", "h2:1", "--out", tmp_path / "out")
    assert code == 130 and "interrupted" in captured.err
    assert list(tmp_path.iterdir()) == []


def test_default_init_is_the_zero_gate_and_a_calibrated_report_shows_the_zero_gate_init_beside_it(tiny_llama,
                                                                                                  tmp_path, capsys):
    code, out = convert(capsys, tiny_llama, "--plan", "h2:1", "--out", tmp_path / "d")
    assert code == 0
    record = json.loads((tmp_path / "d" / "conversion.json").read_text())
    assert record["init_options"] == {"conv": "identity", "gate": "zero", "decay": "slow", "beta": "half",
                                      "align_steps": 0, "long_memory_heads": 0.0}
    assert all(row["relative_error"] == 1.0 for row in record["report"]["layers"]
               if row["type"] in ("mamba2", "gated_deltanet"))
    assert "zero_gate_init" not in record["report"]  # it is the init itself
    code, out = convert(capsys, tiny_llama, "--plan", "h2:1", "--out", tmp_path / "a", "--init-gate", "teacher",
                        "--init-decay", "teacher", "--init-beta", "teacher")
    assert code == 0
    record = json.loads((tmp_path / "a" / "conversion.json").read_text())
    baseline = record["report"]["zero_gate_init"]
    assert f"zero-gate init (Mamba2 / GDN layers skipped): KL {baseline['kl_teacher_hybrid']:.4f}" in out.out
    # the calibrated layers are no longer skips (the zero gate reads exactly 1.0000)
    assert all(row["relative_error"] != 1.0 for row in record["report"]["layers"])


def test_the_report_explains_its_error_column(tiny_llama, tmp_path, capsys):
    code, out = convert(capsys, tiny_llama, "--plan", "h2:1", "--out", tmp_path / "a", "--init-gate", "zero")
    assert code == 0
    assert "    0  mamba2             1.0000" in out.out  # zero gate: the layer starts as an exact skip
    assert "1 = the layer adds nothing (as if\n  skipped)" in out.out
    assert "Mamba2 / Gated DeltaNet layers read 1.0000 when their output gate starts at zero" in out.out


def test_a_relative_teacher_is_recorded_relative_to_the_hybrid_and_found_from_anywhere(tiny_llama, tmp_path, capsys,
                                                                                      monkeypatch):
    """A teacher given as a relative path is recorded relative to the hybrid folder (no absolute local path in a
    record that push publishes), and eval finds it again from another working directory."""
    monkeypatch.chdir(tiny_llama.parent)
    assert convert(capsys, tiny_llama.name, "--plan", "h2:1", "--out", tmp_path / "h")[0] == 0
    record = (tmp_path / "h" / "conversion.json").read_text()
    teacher = json.loads(record)["teacher"]
    assert teacher["source"] == "local folder" and str(tmp_path) not in record
    assert (tmp_path / "h" / teacher["name"]).resolve() == tiny_llama.resolve()
    monkeypatch.chdir(tmp_path)
    assert recorded_teacher(tmp_path / "h")[0] == str(tiny_llama)


def test_out_dot_in_a_users_folder_keeps_the_users_files(tiny_llama, tmp_path):
    """The console script in a folder holding the user's work: refused without --overwrite, and with it the hybrid
    is written beside the user's file, which stays; a second run replaces only its own files."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    command = [sys.executable, "-m", "hybridize", "convert", str(tiny_llama), "--out", "."]
    refused = subprocess.run([*command, "--plan", "all:gated_deltanet"], cwd=work, capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "pass --overwrite" in refused.stderr
    for plan in ("all:gated_deltanet", "h2:1"):
        done = subprocess.run([*command, "--plan", plan, "--overwrite"], cwd=work, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (work / "notes.txt").read_text() == "mine"
    assert json.loads((work / "conversion.json").read_text())["plan_spec"] == "h2:1"
    assert AutoModelForCausalLM.from_pretrained(work).config.layer_types[2] == "full_attention"
    assert not [p.name for p in work.iterdir() if ".partial-" in p.name]
    assert os.listdir(tmp_path) == ["work"]


def test_window_memory_plan_converts_to_its_window_plan_with_a_calibrated_memory(tiny_llama, tmp_path, capsys):
    """The teacher-calibrated conversion of window + GDN layers gives the window plan's logits exactly, and its
    memory branches were fitted (their output projection is no longer W_o) while held at zero, to text that runs
    past the window: a fit within it would zero the memories, and no step could open them."""
    code, out = convert(capsys, tiny_llama, "--plan", "full_attention:0 window_gated_deltanet:rest", "--sink-tokens",
                        "2", "--out", tmp_path / "g", "--init-gate", "teacher", "--init-decay", "teacher",
                        "--init-beta", "teacher")
    assert code == 0 and "start as exactly their sliding window" in out.out
    assert convert(capsys, tiny_llama, "--plan", "full_attention:0 sliding_attention:rest", "--sink-tokens", "2",
                   "--out", tmp_path / "s")[0] == 0
    hybrid, window = (AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in ("g", "s"))
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.randint(0, 49152, (2, 40))
    with torch.no_grad():
        assert torch.equal(hybrid(ids, use_cache=False).logits, window(ids, use_cache=False).logits)
    mixer = hybrid.model.layers[1].mixer
    assert not mixer.memory_scale.any()
    assert not torch.equal(mixer.memory.o_proj.weight, teacher.model.layers[1].self_attn.o_proj.weight)
    assert mixer.memory.A_log.dtype == torch.float32
    hybrid(ids, labels=ids, use_cache=False).loss.backward()
    for layer in hybrid.model.layers[1:]:  # training can open every memory: its scale has a gradient at step 0
        assert layer.mixer.memory_scale.grad.abs().max() > 0
    record = json.loads((tmp_path / "g" / "conversion.json").read_text())
    reports = {name: json.loads((tmp_path / name / "conversion.json").read_text())["report"] for name in ("g", "s")}
    assert record["layer_types"][1:] == ["window_gated_deltanet"] * 3
    assert reports["g"]["kl_teacher_hybrid"] == reports["s"]["kl_teacher_hybrid"]
