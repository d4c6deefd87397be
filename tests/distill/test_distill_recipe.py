"""Recipes: every shipped recipe and accelerate config loads; bad keys and values are one error line naming the key."""

import re

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from distill_support import REPO

from hybridize.convert.plan import resolve_plan
from hybridize.distill.recipe import (
    AttentionOutputStage, KDStage, OnPolicyStage, apply_override, load_recipe, parse_recipe, read_recipe, smoke_overrides,
)
from hybridize.distill.tracking import GAP_TRAIN_STEPS, held_out_gap
from hybridize.errors import UserError

RECIPES = sorted(p for p in (REPO / "recipes").glob("*/*.yaml") if p.parent.name != "accelerate")
STUDY_RECIPES = sorted((REPO / "recipes" / "smollm2-135m" / "study").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
TEACHER_LAYERS = {"smollm2-135m": 30, "llama3.2-1b": 16}


def minimal(**extra) -> dict:
    raw = {
        "teacher": "smollm2-135m", "init": "some/folder", "output_dir": "out",
        "stages": [
            {"name": "a", "kind": "attention_output", "tokens": 100, "seq_len": 10, "global_batch_size": 4,
             "micro_batch_size": 2, "lr": 1e-3},
            {"name": "b", "kind": "kd", "tokens": 100, "seq_len": 10, "global_batch_size": 4,
             "micro_batch_size": 2, "lr": 1e-4},
        ],
    }
    raw.update(extra)
    return raw


def error_for(raw: dict) -> str:
    with pytest.raises(UserError) as caught:
        parse_recipe(raw)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_both_teachers_have_recipes():
    assert {p.parent.name for p in RECIPES} == set(TEACHER_LAYERS)
    assert {p.stem for p in ACCELERATE_CONFIGS} == {"single_gpu", "ddp", "fsdp2"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_loads_and_its_plan_resolves(path):
    recipe = load_recipe(path)
    on_policy = [OnPolicyStage] if path.stem.endswith("-onpolicy") else []
    assert [type(s) for s in recipe.stages] == [AttentionOutputStage, KDStage] + on_policy
    layer_types = resolve_plan(recipe.plan, TEACHER_LAYERS[path.parent.name])
    replaced = set(layer_types) - {"full_attention"}
    assert len(replaced) == 1  # one mixer type replaces attention: in every layer in the constant-memory recipe
    assert "full_attention" in layer_types or path.stem == "constant-memory"
    assert all(stage.steps() >= 100 for stage in recipe.stages)
    assert recipe.output_dir == f"runs/{path.parent.name}-{path.stem}"


def test_study_recipes_share_one_token_budget_and_take_any_plan():
    """The results study compares plans and stages at equal cost: every study recipe trains on the same tokens."""
    assert [p.stem for p in STUDY_RECIPES] == ["both", "stage1_only", "stage2_only"]
    for path in STUDY_RECIPES:
        raw = read_recipe(path)
        apply_override(raw, "plan=h2:8")
        recipe = parse_recipe(raw, str(path))
        assert sum(stage.tokens for stage in recipe.stages) == 3_000_000
        assert all(stage.seq_len == 2048 for stage in recipe.stages)  # past the 512 window, also in stage 1
        assert resolve_plan(recipe.plan, TEACHER_LAYERS["smollm2-135m"]).count("full_attention") == 8


@pytest.mark.parametrize("path", RECIPES + STUDY_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_has_one_run_line_in_the_readme(path):
    readme = (REPO / "recipes" / "README.md").read_text()
    relative = path.relative_to(REPO).as_posix()
    lines = [line for line in readme.splitlines() if re.search(rf"(?<![\w/.-]){re.escape(relative)}(?![\w/.-])", line)]
    rows = [line for line in lines if line.startswith("|")]  # the recipe table: one row, one command, per recipe
    assert len(rows) == 1, lines
    command = re.search(r"`(accelerate launch [^`]*)`", rows[0]).group(1).split()
    assert command[:3] == ["accelerate", "launch", "--config_file"] and (REPO / command[3]).is_file()
    assert command[4:] == ["-m", "hybridize.distill", relative]


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load_with_accelerate(path):
    config = load_config_from_file(str(path))
    expected = {"single_gpu": ("NO", 1), "ddp": ("MULTI_GPU", 2), "fsdp2": ("FSDP", 2)}[path.stem]
    assert (str(config.distributed_type).split(".")[-1], config.num_processes) == expected
    assert config.mixed_precision == "bf16"
    if path.stem == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_smoke_overrides_keep_a_shipped_recipe_valid():
    raw = read_recipe(RECIPES[0])
    for assignment in smoke_overrides(raw):
        apply_override(raw, assignment)
    recipe = parse_recipe(raw)
    assert all(s.seq_len <= 128 and s.global_batch_size == 2 for s in recipe.stages)
    assert recipe.data.max_documents == 64


def test_defaults_and_numbers_written_as_strings():
    recipe = parse_recipe(minimal(stages=[{**minimal()["stages"][1], "lr": "3e-4", "tokens": 2_000}]))
    stage = recipe.stages[0]
    assert stage.lr == 3e-4 and isinstance(stage.lr, float)
    assert stage.trainable == ["model.layers.*"] and stage.temperature == 1.0 and stage.lora is None
    assert stage.steps() == 50  # 2000 tokens / (4 x 10 per step)
    assert recipe.data.source == "corpus" and recipe.logging.trackers is None


@pytest.mark.parametrize("raw, key", [
    (minimal(teacherr="x"), "teacherr: unknown key"),
    (minimal(data={"sourc": "corpus"}), "data.sourc: unknown key"),
    (minimal(checkpoint={"every": 3}), "checkpoint.every: unknown key"),
    ({**minimal(), "stages": [{**minimal()["stages"][1], "tempurature": 2.0}]}, "stages[0].tempurature: unknown key"),
    # KD-only keys are unknown on a stage-1 stage
    ({**minimal(), "stages": [{**minimal()["stages"][0], "temperature": 2.0}]}, "stages[0].temperature: unknown key"),
    ({**minimal(), "stages": [{**minimal()["stages"][1], "lora": {"rnk": 4}}]}, "stages[0].lora.rnk: unknown key"),
])
def test_unknown_keys_are_named(raw, key):
    message = error_for(raw)
    assert message.startswith(f"recipe: {key}"), message
    assert "allowed:" in message


@pytest.mark.parametrize("change, key", [
    ({"lr": "fast"}, "stages[1].lr: expected a number, got 'fast'"),
    ({"kind": "distill"}, "stages[1].kind: allowed values: attention_output, kd"),
    ({"seq_len": 0}, "stages[1].seq_len: must be >= 1"),
    ({"global_batch_size": 5}, "stages[1].global_batch_size: must be a multiple of micro_batch_size (2)"),
    ({"temperature": 0}, "stages[1].temperature: must be in (0, 100], got 0"),
    ({"lr": 1e39}, "stages[1].lr: must be in (0, 1e+30], got 1e+39"),
    ({"lr": "1e39"}, "stages[1].lr: must be in (0, 1e+30], got 1e+39"),
    ({"lr": float("nan")}, "stages[1].lr: must be a finite number, got nan"),
    ({"lr_by_layer_type": {"mamba2": 1e31}}, "stages[1].lr_by_layer_type.mamba2: must be in (0, 1e+30]"),
    ({"half_life_lr": 0}, "stages[1].half_life_lr: must be in (0, 1e+30], got 0"),
    ({"memory_lr": -1e-3}, "stages[1].memory_lr: must be in (0, 1e+30], got -0.001"),
    ({"betas": [0.9, 1.5]}, "stages[1].betas: must be two numbers in [0, 0.9999]"),
    ({"weight_decay": 10.0}, "stages[1].weight_decay: must be in [0, 1], got 10"),
    ({"max_grad_norm": float("inf")}, "stages[1].max_grad_norm: must be a finite number"),
    ({"max_grad_norm": 1e9}, "stages[1].max_grad_norm: must be in (0, 1e6]"),
    ({"tokens": 10**16}, "stages[1].tokens: must be at most 1,000,000,000,000,000"),
    ({"global_batch_size": 2**22}, "stages[1].global_batch_size: must be at most 1,048,576"),
    ({"seq_len": 2**21}, "stages[1].seq_len: must be at most 1,048,576"),
    ({"ce_weight": 1e6}, "stages[1].ce_weight: must be in [0, 1000]"),
    ({"lr_by_layer_type": {"mamba3": 1e-3}}, "stages[1].lr_by_layer_type.mamba3: not a layer type"),
    ({"trainable": ["ssm:model.*"]}, "stages[1].trainable[0]: 'ssm' before ':' is not a layer type"),
    ({"lora": {"targets": ["embeddings"]}}, "stages[1].lora.targets[0]: allowed values: attention, mlp"),
    ({"tokens": True}, "stages[1].tokens: expected an integer, got True"),
])
def test_invalid_stage_values_are_named(change, key):
    raw = minimal()
    raw["stages"][1].update(change)
    assert error_for(raw).startswith(f"recipe: {key}")


def test_invalid_top_level_values_are_named():
    assert error_for(minimal(plan="uniform:2")).startswith("recipe: init: give exactly one of")
    assert error_for(minimal(mixed_precision="fp16")).startswith("recipe: mixed_precision: allowed values: bf16, no")
    assert error_for(minimal(data={"domains": ["poetry"]})).startswith("recipe: data.domains[0]: allowed values")
    assert error_for(minimal(logging={"trackers": ["mlflow"]})).startswith(
        "recipe: logging.trackers[0]: allowed values")
    plan = minimal(plan="uniform:2")
    del plan["init"]
    assert error_for({**plan, "sink_tokens": -1}).startswith("recipe: sink_tokens: must be >= 0")
    assert parse_recipe({**plan, "sink_tokens": 4}).sink_tokens == 4
    assert error_for({**plan, "init_long_heads": 1.5}).startswith("recipe: init_long_heads: must be in [0, 1]")
    assert parse_recipe({**plan, "init_long_heads": 0.25, "init_decay": "teacher"}).init_long_heads == 0.25
    assert parse_recipe({**plan, "recurrent_rope": True}).recurrent_rope is True
    chosen = parse_recipe({**plan, "init_gate": "zero", "init_decay": "slow", "init_beta": "half"})
    assert (chosen.init_gate, chosen.init_decay, chosen.init_beta) == ("zero", "slow", "half")
    assert parse_recipe(plan).init_gate is None  # unset: the convert default
    assert error_for({**plan, "init_gate": "closed"}).startswith("recipe: init_gate: allowed values: zero, random, "
                                                                "teacher")
    assert error_for({**plan, "init_decay": "slow", "init_long_heads": 0.25}).startswith(
        "recipe: init_long_heads: applies to init_decay: teacher, not slow")
    assert error_for({**plan, "init_long_heads": 0.25}).startswith(
        "recipe: init_long_heads: applies to init_decay: teacher, not slow (the default)")
    # With an init folder they parse too: the trainer checks them against the folder (test_distill_trainer.py).
    assert parse_recipe(minimal(recurrent_rope=True, init_long_heads=0.25, sink_tokens=4)).sink_tokens == 4
    raw = minimal()
    raw["stages"][1]["name"] = "a"
    assert error_for(raw).startswith("recipe: stages[1].name: 'a' is used by an earlier stage")
    del raw["stages"][0]["lr"]
    assert error_for(raw).startswith("recipe: stages[0].lr: required key is missing")


def test_overrides_set_existing_and_new_keys():
    raw = minimal()
    apply_override(raw, "stages.1.lr=5e-5")
    apply_override(raw, "stages.1.lora.rank=4")
    apply_override(raw, "data.max_documents=10")
    apply_override(raw, "stages.0.lr_by_layer_type={mamba2: 0.01}")
    recipe = parse_recipe(raw)
    assert recipe.stages[1].lr == 5e-5 and recipe.stages[1].lora.rank == 4
    assert recipe.data.max_documents == 10 and recipe.stages[0].lr_by_layer_type == {"mamba2": 0.01}
    apply_override(raw, "stages.0.lr_by_layer_type=null")  # null clears a mapping
    assert parse_recipe(raw).stages[0].lr_by_layer_type == {}
    with pytest.raises(UserError, match=r"stages\.7 is not an index of a list of 2"):
        apply_override(raw, "stages.7.lr=1")
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        apply_override(raw, "stages.0.lr")


def test_file_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="cannot read it"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text(yaml.safe_dump(minimal(seed="zero")))
    with pytest.raises(UserError, match=rf"recipe {re.escape(str(bad))}: seed: expected an integer"):
        load_recipe(bad)


def test_shipped_recipes_need_no_tracker_and_none_warns():
    from hybridize.distill.tracking import usable_trackers

    assert all(load_recipe(path).logging.trackers is None for path in RECIPES + STUDY_RECIPES)
    installed, missing = usable_trackers(None)
    assert missing == [] and set(installed) <= {"tensorboard"}


def test_relative_input_paths_are_read_against_the_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "plan.json").write_text('{"layer_types": ["full_attention", "mamba2"]}')
    (folder / "docs.jsonl").write_text('{"text": "x"}\n')
    raw = minimal(plan="plan.json", data={"source": "docs.jsonl"}, output_dir="runs/x")
    del raw["init"]
    (folder / "r.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # another working directory than the recipe's
    recipe = load_recipe("recipes/r.yaml", ["stages.0.lr=2e-3"])
    assert resolve_plan(recipe.plan, 2) == ["full_attention", "mamba2"]
    assert recipe.data.source == str(folder / "docs.jsonl")
    assert recipe.teacher == "smollm2-135m" and recipe.output_dir == "runs/x"  # an alias; outputs stay cwd-relative


def test_smoke_runs_get_their_own_folder_and_out_is_the_flag():
    import argparse

    from hybridize.distill.cli import add_arguments, build_recipe

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    path = str(RECIPES[0])
    assert build_recipe(parser.parse_args([path, "--smoke"])).output_dir == "runs/llama3.2-1b-gdn-smoke"
    assert build_recipe(parser.parse_args([path, "--smoke", "--out", "o"])).output_dir == "o"
    assert build_recipe(parser.parse_args([path, "--output-dir", "o2"])).output_dir == "o2"


def test_library_roots_are_read_against_the_recipe_folder(tmp_path):
    (tmp_path / "texts").mkdir()
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL_LIBRARY_RECIPE)
    recipe = load_recipe(path)
    assert recipe.data.source == "library"
    assert recipe.data.roots == ["stdlib", str(tmp_path / "texts"), "elsewhere"]
    with pytest.raises(UserError, match=r"data.roots: name at least one"):
        load_recipe(path, ["data.roots=[]"])


MINIMAL_LIBRARY_RECIPE = """
teacher: smollm2-135m
init: init
output_dir: out
data: {source: library, roots: [stdlib, texts, elsewhere]}
stages:
  - {name: kd, kind: kd, tokens: 1000, seq_len: 64, global_batch_size: 2, micro_batch_size: 1, lr: 1.0e-4}
"""


def test_the_held_out_gap_compares_the_last_train_steps_with_the_final_evaluation():
    train = [{"split": "train", "loss": 9.0, "kl": 5.0}] + [{"split": "train", "loss": 2.0, "kl": 0.1 + i / 100}
                                                           for i in range(GAP_TRAIN_STEPS)]
    evals = [{"split": "eval", "loss": 8.0, "kl": 4.0}, {"split": "eval", "loss": 2.5, "kl": 0.145}]
    gap = held_out_gap(train[:6] + evals[:1] + train[6:] + evals[1:])
    mean = 0.1 + (GAP_TRAIN_STEPS - 1) / 200  # the first step, at kl 5.0, is outside the window
    assert gap["metric"] == "kl" and gap["train_steps"] == GAP_TRAIN_STEPS
    assert gap["train_last_steps"] == pytest.approx(mean) and gap["gap"] == pytest.approx(0.145 - mean)
    stage_one = held_out_gap([{"split": "train", "loss": 1.0}, {"split": "eval", "loss": 1.5}])
    assert stage_one["metric"] == "loss" and stage_one["gap"] == pytest.approx(0.5)
    assert held_out_gap([{"split": "train", "loss": 1.0}]) is None


def test_part_shares_are_checked_against_the_source_and_the_parts():
    library = {"source": "library", "domains": ["code", "prose"]}
    shares = {"code": 0.75, "prose": 0.25}
    assert parse_recipe(minimal(data={**library, "part_shares": shares})).data.part_shares == shares
    assert error_for(minimal(data={"part_shares": {"code": 0.5, "docs": 0.25, "prose": 0.25}})).startswith(
        "recipe: data.part_shares: only the library source has parts")
    assert error_for(minimal(data={**library, "part_shares": {"code": 1.0}})).startswith(
        "recipe: data.part_shares: give a share to each of the parts read (code, prose)")
    assert error_for(minimal(data={**library, "part_shares": {"code": 0.75, "prose": 0.5}})).startswith(
        "recipe: data.part_shares: shares must sum to 1, got 1.25")
    assert error_for(minimal(data={**library, "part_shares": {"code": 1.0, "prose": 0.0}})).startswith(
        "recipe: data.part_shares.prose: must be in (0, 1]")
