"""Plan specs resolve to one layer type per layer, and bad specs get one clear UserError."""

import json

import pytest

from hybridize.convert.plan import (
    H2_CYCLE, SHORT_NAMES, describe, plan_headwise_kv_heads, resolve_plan, uniform_positions,
)
from hybridize.model import LAYER_TYPES
from hybridize.errors import UserError


def test_uniform_spreads_attention_and_avoids_layer_zero():
    assert uniform_positions(30, 8) == [1, 5, 9, 13, 16, 20, 24, 28]
    plan = resolve_plan("uniform:8", 30)
    assert [i for i, k in enumerate(plan) if k == "full_attention"] == [1, 5, 9, 13, 16, 20, 24, 28]
    assert set(plan) == {"full_attention", "gated_deltanet"}
    assert set(resolve_plan("uniform:3:mamba2", 12)) == {"full_attention", "mamba2"}


def test_window_memory_layers_are_plannable_in_every_form(tmp_path):
    plan = resolve_plan("uniform:8:window_gated_deltanet", 30)
    assert [i for i, k in enumerate(plan) if k == "full_attention"] == [1, 5, 9, 13, 16, 20, 24, 28]
    assert set(plan) == {"full_attention", "window_gated_deltanet"}
    constant = ["window_gated_deltanet"] * 30  # no full attention: the cache does not grow with the context
    assert resolve_plan("uniform:0:window_gated_deltanet", 30) == resolve_plan("all:window_gated_deltanet", 30) == constant
    assert resolve_plan("full_attention:0 window_mamba2:rest", 3) == ["full_attention", "window_mamba2", "window_mamba2"]
    assert resolve_plan(["window_mamba2", "window_gated_deltanet"], 2) == ["window_mamba2", "window_gated_deltanet"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"layer_types": constant}))
    assert resolve_plan(str(path), 30) == constant
    assert describe(["full_attention", "window_gated_deltanet", "window_mamba2"]).startswith("Agm ")


@pytest.mark.parametrize("kind", ["headwise_gated_deltanet", "headwise_mamba2"])
def test_headwise_layers_are_plannable_in_every_form(kind, tmp_path):
    plan = resolve_plan(f"uniform:8:{kind}", 30)
    assert [i for i, k in enumerate(plan) if k == "full_attention"] == [1, 5, 9, 13, 16, 20, 24, 28]
    assert set(plan) == {"full_attention", kind}
    assert resolve_plan(f"all:{kind}", 2) == resolve_plan([kind, kind], 2) == [kind, kind]
    assert resolve_plan(f"full_attention:1 {kind}:rest", 3) == [kind, "full_attention", kind]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"layer_types": [kind, "full_attention"], "headwise_kv_heads": {"0": [1]}}))
    assert resolve_plan(str(path), 2) == [kind, "full_attention"]
    assert plan_headwise_kv_heads(str(path)) == {"0": [1]}
    assert plan_headwise_kv_heads(f"all:{kind}") is None  # not a file: conversion keeps the first half


def test_every_layer_type_has_its_own_letter():
    assert set(SHORT_NAMES) == set(LAYER_TYPES) and len(set(SHORT_NAMES.values())) == len(SHORT_NAMES)
    assert describe(["full_attention", "headwise_gated_deltanet", "headwise_mamba2"]).startswith("Ahk ")


def test_h2_cycles_mamba2_gdn_swa_over_replaced_layers():
    plan = resolve_plan("h2:2", 8)
    replaced = [k for k in plan if k != "full_attention"]
    assert plan.count("full_attention") == 2
    assert replaced == [H2_CYCLE[i % 3] for i in range(6)]


def test_compact_spec_list_and_json_file(tmp_path):
    plan = resolve_plan("full_attention:0,3 mamba2:1 gated_deltanet:rest", 5)
    assert plan == ["full_attention", "mamba2", "gated_deltanet", "full_attention", "gated_deltanet"]
    assert resolve_plan(list(plan), 5) == plan
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"layer_types": plan, "scores": {}}))
    assert resolve_plan(str(path), 5) == plan
    assert resolve_plan("all:sliding_attention", 3) == ["sliding_attention"] * 3


@pytest.mark.parametrize(
    "spec, message",
    [
        ("uniform:31", "attention budget must be an integer in 0..30"),
        ("h2:x", "attention budget must be an integer"),
        ("full_attention:0,40 mamba2:rest", "layer index '40' is not in 0..29"),
        ("full_attention:0 mamba2:0 gated_deltanet:rest", "layer 0 is named twice"),
        ("full_attention:0,1", "leaves layers"),
        ("lstm:rest", "unknown layer type 'lstm'"),
        (["mamba2"] * 29, "plan has 29 layers but the model has 30"),
        ("missing.json", "cannot read a 'layer_types' list"),
        ("diagonal:4", "unknown layer type 'diagonal'"),
    ],
)
def test_bad_specs_get_one_clear_error(spec, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_plan(spec, 30)
