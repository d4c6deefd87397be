"""Teachers as users have them: bf16/fp16/fp32, sharded or not, tied or untied, llama3 RoPE scaling, head_dim != hidden
/ heads, a chat template and a generation config; then convert -> generate() -> eval -> bench -> a shipped recipe's
smoke distill on each, and the refusals (pickled weights, no tokenizer, a mistyped folder)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import rel_rmse
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from hybridize.cli import main
from hybridize.corpus import documents
from hybridize.distill.export import load_student
from hybridize.dtypes import stored_dtype
from hybridize.model.modeling_hybrid import FP32_PARAMETERS
from hybridize.teacher import teacher_folder

REPO = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# name -> (dtype, max shard size or None, tied embeddings, head_dim, rope parameters or None)
TEACHERS = {
    "bf16-sharded-untied-llama3rope": (torch.bfloat16, "2MB", False, 32, LLAMA3_ROPE),
    "fp16-single-file-tied": (torch.float16, None, True, 24, None),
    "fp32-sharded-tied": (torch.float32, "3MB", True, 16, None),
}
# Mamba2, Gated DeltaNet, full attention, sliding window; random output gates so every mixer reaches the logits.
PLAN = ["--plan", "h2:1", "--init-gate", "random"]
EVAL_SMALL = ["--seq-len", "48", "--blocks", "1", "--greedy-prompts", "1", "--passkey-lengths", "96",
              "--passkey-depths", "0,1", "--passkey-trials", "1", "--mqar-pairs", "4"]


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def save_teacher(folder: Path, dtype: torch.dtype, shard: str | None, tied: bool, head_dim: int, rope) -> Path:
    """A random 4-layer Llama (hidden 64, 4 query / 2 KV heads) saved in `dtype` with the real SmolLM2 tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_folder(None))
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, tie_word_embeddings=tied,
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, initializer_range=0.1,
                         rope_parameters=rope)
    model = LlamaForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[2, 3], do_sample=True, temperature=0.6,
                                               top_p=0.9)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(TEACHERS))
def teacher(request, tmp_path_factory):
    dtype, shard, tied, head_dim, rope = TEACHERS[request.param]
    folder = save_teacher(tmp_path_factory.mktemp("teacher") / request.param, dtype, shard, tied, head_dim, rope)
    assert (folder / "model.safetensors.index.json").exists() == (shard is not None)
    return folder, dtype


@pytest.fixture(scope="module")
def hybrid(teacher, tmp_path_factory):
    folder, _ = teacher
    out = tmp_path_factory.mktemp("hybrid") / "h"
    assert main(["convert", str(folder), *PLAN, "--out", str(out)]) == 0
    return out


def saved_dtypes(folder: Path) -> dict[str, torch.dtype]:
    dtypes = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            dtypes.update((key, handle.get_tensor(key).dtype) for key in handle.keys())
    return dtypes


def test_convert_writes_the_stored_dtype_and_keeps_decay_parameters_fp32(teacher, hybrid):
    _, dtype = teacher
    dtypes = saved_dtypes(hybrid)
    kept_fp32 = {key for key in dtypes if re.search(FP32_PARAMETERS, key)}
    assert {k.rsplit(".", 1)[1] for k in kept_fp32} == {"A_log", "dt_bias", "D"}
    assert {dtypes[k] for k in kept_fp32} == {torch.float32}
    assert {dtypes[k] for k in dtypes if k not in kept_fp32} == {dtype}
    assert stored_dtype(hybrid) == dtype
    record = json.loads((hybrid / "conversion.json").read_text())
    assert record["dtype"] == str(dtype).removeprefix("torch.")
    assert all(torch.isfinite(torch.tensor(row["relative_error"])) for row in record["report"]["layers"])
    assert torch.isfinite(torch.tensor(record["report"]["kl_teacher_hybrid"]))


def test_generation_config_and_chat_template_are_carried_over(teacher, hybrid):
    generation = GenerationConfig.from_pretrained(hybrid)
    assert generation.eos_token_id == [2, 3] and generation.temperature == 0.6 and generation.top_p == 0.9
    assert AutoTokenizer.from_pretrained(hybrid).chat_template == CHAT_TEMPLATE


def test_rope_scaling_and_embeddings_are_the_teachers(teacher, hybrid):
    folder, _ = teacher
    teacher_config = json.loads((folder / "config.json").read_text())
    config = json.loads((hybrid / "config.json").read_text())
    for key in ("rope_parameters", "tie_word_embeddings", "head_dim", "num_key_value_heads"):
        assert config[key] == teacher_config[key], key
    assert ("lm_head.weight" in saved_dtypes(hybrid)) == (not teacher_config["tie_word_embeddings"])


def test_generate_with_the_cache_matches_a_full_forward(teacher, hybrid):
    """Prefill + one cached step gives the full forward's last logits, in the stored dtype, within its rounding."""
    _, dtype = teacher
    model = AutoModelForCausalLM.from_pretrained(hybrid).eval()
    assert model.dtype == dtype and model.model.layers[0].mixer.A_log.dtype == torch.float32
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        prefill = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=prefill.past_key_values, use_cache=True).logits[:, -1]
    # Two evaluation orders of the same 4-layer network: each of the ~10 rounded ops per layer may differ by one
    # unit roundoff in relative terms between the two, so 4 * 10 * u bounds the logits' relative difference.
    assert torch.isfinite(full).all() and rel_rmse(step, full) <= 40 * unit_roundoff(dtype)
    generated = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 11)


def test_all_attention_plan_equals_llama_in_the_stored_dtype(teacher, tmp_path):
    folder, dtype = teacher
    assert main(["convert", str(folder), "--plan", "all:full_attention", "--out", str(tmp_path / "a")]) == 0
    llama = AutoModelForCausalLM.from_pretrained(folder).eval()
    hybrid = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    assert llama.dtype == hybrid.dtype == dtype
    ids = torch.randint(0, llama.config.vocab_size, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = llama(ids).logits, hybrid(ids, use_cache=False).logits
    # The same weights through the same ops; a different attention kernel may reorder each layer's sums, which
    # moves every rounded op by at most one unit roundoff: 4 layers x ~10 ops.
    assert rel_rmse(actual, expected) <= 40 * unit_roundoff(dtype)


def test_eval_and_bench_run_in_the_stored_dtype(teacher, hybrid, tmp_path):
    folder, dtype = teacher
    name = str(dtype).removeprefix("torch.")
    out = tmp_path / "eval"
    assert main(["eval", str(hybrid), "--teacher", str(folder), "--dtype", name, "--out", str(out), *EVAL_SMALL]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["dtype"] == name
    assert all(torch.isfinite(torch.tensor(row["kl"])) for row in results["quality"]["domains"].values())
    bench_out = tmp_path / "bench"
    assert main(["bench", str(hybrid), "--teacher", str(folder), "--dtype", name, "--out", str(bench_out),
                 "--contexts", "32", "--batch-sizes", "1", "--new-tokens", "4", "--repeats", "1"]) == 0
    assert json.loads((bench_out / "bench.json").read_text())["dtype"] == name


def test_analyze_scores_the_teacher_and_training_loads_fp32_master_weights(teacher, hybrid, tmp_path):
    folder, _ = teacher
    out = tmp_path / "analysis"
    assert main(["analyze", str(folder), "--budget", "1", "--fast", "--seq-len", "640", "--eval-blocks", "1",
                 "--out", str(out)]) == 0
    assert len(json.loads((out / "plan.json").read_text())["layer_types"]) == 4
    student = load_student(hybrid)  # what each distillation stage trains: fp32, whatever the folder stores
    assert {p.dtype for p in student.parameters()} == {torch.float32}


def test_the_shipped_1b_recipe_runs_on_the_teacher_in_smoke_mode(teacher, tmp_path):
    """recipes/llama3.2-1b/gdn.yaml, pointed at this teacher, every layer type and local text: convert, 2 steps of
    stage 1, 2 of stage 2, export."""
    folder, dtype = teacher
    text = tmp_path / "docs.jsonl"
    picked = list(documents("code", "train")[:12]) + list(documents("prose", "train")[:12])
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in picked))
    out = tmp_path / "run"
    overrides = [f"teacher={folder}", "plan=h2:1", f"data.source={text}", "data.subset=null",
                 "data.num_proc=1", "stages.0.seq_len=32", "stages.1.seq_len=32", "stages.1.kl_chunk_tokens=16"]
    command = [sys.executable, "-m", "hybridize.distill", str(REPO / "recipes" / "llama3.2-1b" / "gdn.yaml"),
               "--smoke", "--max-steps", "2", "--out", str(out)]
    for assignment in overrides:
        command += ["--set", assignment]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    final = out / "final"
    assert stored_dtype(final) == dtype  # the hybrid leaves training in the dtype its teacher was stored in
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.layer_types == ["mamba2", "gated_deltanet", "full_attention", "sliding_attention"]
    steps = [stage["steps_done"] for stage in json.loads((final / "distill.json").read_text())["stages"]]
    assert steps == [2, 2]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]]), use_cache=False).logits).all()


def test_a_hub_id_loads_offline_from_the_local_hf_cache(tmp_path):
    """The Hub path without a network: a model in the HF cache layout (models--org--name/snapshots/REV, refs/main)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    save_teacher(repo / "snapshots" / revision, torch.bfloat16, None, True, 16, None)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "h"
    result = subprocess.run([sys.executable, "-m", "hybridize.cli", "convert", "acme/tiny-llama", "--plan",
                             "all:gated_deltanet", "--out", str(out)], env=env, capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "conversion.json").read_text())
    assert record["teacher"]["name"] == "acme/tiny-llama" and record["teacher"]["revision"] == revision
    assert stored_dtype(out) == torch.bfloat16


def one_line_error(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_pickled_weights_are_refused_with_how_to_convert(tmp_path, capsys):
    folder = save_teacher(tmp_path / "t", torch.bfloat16, None, True, 16, None)
    state = {key: handle.get_tensor(key) for handle in [safe_open(str(folder / "model.safetensors"), "pt")]
             for key in handle.keys()}
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    err = one_line_error(capsys, "convert", str(folder), "--plan", "all:mamba2", "--out", str(tmp_path / "o"))
    assert "pytorch_model.bin" in err and "save_pretrained" in err
    assert not (tmp_path / "o").exists()


def test_a_teacher_without_a_tokenizer_is_one_clear_line(tmp_path, capsys):
    folder = save_teacher(tmp_path / "t", torch.float32, None, True, 16, None)
    for path in folder.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            path.unlink()
    err = one_line_error(capsys, "convert", str(folder), "--plan", "all:mamba2", "--out", str(tmp_path / "o"))
    assert "no tokenizer" in err


def test_a_mistyped_relative_folder_is_named_as_a_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, "convert", "models/tiny-lama", "--plan", "all:mamba2", "--out", "o")
    assert str(tmp_path / "models" / "tiny-lama") in err and "no such local folder" in err
    err = one_line_error(capsys, "convert", "runs/models/tiny", "--plan", "all:mamba2", "--out", "o")
    assert "no model folder" in err and "Hub" not in err
