"""train_windows: a window length drawn per optimizer step for the windows of window + memory layers."""

import json

import pytest
import torch
from distill_support import metrics, tiny_recipe, write_recipe

from hybridize.distill.__main__ import main as distill_main
from hybridize.distill.recipe import parse_recipe
from hybridize.errors import UserError
from hybridize.distill.window_draws import branch_windows, draw_window, trained_window
from hybridize.model import HybridConfig, HybridForCausalLM


def _model(layer_types, window=24):
    torch.manual_seed(0)
    config = HybridConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=len(layer_types),
                          num_attention_heads=4, num_key_value_heads=2, layer_types=layer_types, sliding_window=window,
                          headwise_kv_heads={str(i): [0] for i, k in enumerate(layer_types) if k.startswith("headwise")})
    return HybridForCausalLM(config).eval()


def test_draws_are_a_function_of_seed_stage_and_step():
    lengths = [8, 16, 24]
    draws = [draw_window(lengths, 0, 1, step) for step in range(60)]
    assert draws == [draw_window(lengths, 0, 1, step) for step in range(60)], "a resumed run draws the same"
    assert set(draws) == set(lengths)
    assert draws != [draw_window(lengths, 1, 1, step) for step in range(60)]
    assert draws != [draw_window(lengths, 0, 2, step) for step in range(60)]


def test_the_drawn_window_is_the_window_the_layers_attend_and_is_restored():
    """Inside trained_window the window + memory layers compute what the same weights with that window in the config
    compute; plain sliding windows and head-wise layers without a window keep theirs; on leaving, even by an error,
    every window is the model's again."""
    model = _model(["window_gated_deltanet", "sliding_attention", "headwise_gated_deltanet", "window_mamba2"])
    windows = branch_windows(model)
    assert windows == [model.model.layers[0].mixer.window, model.model.layers[3].mixer.window]
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        with trained_window(windows, 6):
            short = model(ids).logits
            assert model.model.layers[1].mixer.window == 24
        assert torch.equal(model(ids).logits, full)
    reference = _model(["window_gated_deltanet", "sliding_attention", "headwise_gated_deltanet", "window_mamba2"])
    reference.load_state_dict(model.state_dict())
    for i in (0, 3):
        reference.model.layers[i].mixer.window.window = 6
    with torch.no_grad():
        torch.testing.assert_close(short, reference(ids).logits)
    assert not torch.allclose(short, full)
    with pytest.raises(RuntimeError), trained_window(windows, 6):
        raise RuntimeError("a failed step")
    assert [w.window for w in windows] == [24, 24]


def test_a_run_draws_per_step_and_keeps_the_models_window(tmp_path, tiny_models, text_file):
    """Each logged step names its drawn window, the one draw_window gives, and trains with it; the stage's result keeps
    the model's window."""
    run = tmp_path / "run"
    raw = tiny_recipe(tiny_models, text_file, run, {
        "plan": "all:window_gated_deltanet", "init": None,
        "stages.0.train_windows": [4, 16], "stages.1.train_windows": [8]})
    assert distill_main([str(write_recipe(tmp_path / "r.yaml", raw)), "--max-steps", "3"]) == 0
    rows = [r for r in metrics(run) if r["split"] == "train"]
    for stage, lengths in ((0, [4, 16]), (1, [8])):
        drawn = [(r["step"], r["train_window"]) for r in rows if r["stage_index"] == stage]
        assert drawn == [(step, draw_window(lengths, 0, stage, step - 1)) for step in (1, 2, 3)]
    assert json.loads((run / "final" / "config.json").read_text())["sliding_window"] == \
        json.loads((run / "init" / "config.json").read_text())["sliding_window"]
    # the draw is what the step trained with: the same first step with the model's own windows has another loss
    plain = tmp_path / "plain"
    raw = tiny_recipe(tiny_models, text_file, plain, {"plan": "all:window_gated_deltanet", "init": None})
    assert distill_main([str(write_recipe(tmp_path / "p.yaml", raw)), "--max-steps", "1"]) == 0
    first = [r["loss"] for r in metrics(plain) if r["split"] == "train" and r["stage_index"] == 0]
    assert first[0] != pytest.approx(rows[0]["loss"], rel=1e-3)


@pytest.mark.parametrize("change, message", [
    ({"stages.0.train_windows": [8]}, "stages[0].train_windows applies to the windows of window_gated_deltanet"),
    ({"plan": "all:window_gated_deltanet", "init": None, "stages.1.train_windows": [100_000]},
     "stage 'kd': train_windows [100000] holds a window longer than the model's"),
])
def test_train_windows_that_cannot_apply_are_one_line(tmp_path, tiny_models, text_file, capsys, change, message):
    raw = tiny_recipe(tiny_models, text_file, tmp_path / "run", change)
    assert distill_main([str(write_recipe(tmp_path / "r.yaml", raw)), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1


@pytest.mark.parametrize("windows, message", [
    ([], "stages[0].train_windows: must be a list of window lengths >= 1, got []"),
    ([0, 8], "stages[0].train_windows: must be a list of window lengths >= 1, got [0, 8]"),
])
def test_bad_train_windows_are_recipe_errors(windows, message):
    raw = {"teacher": "t", "plan": "all:window_gated_deltanet", "output_dir": "o",
           "stages": [{"name": "a", "kind": "kd", "tokens": 8, "seq_len": 4, "global_batch_size": 1,
                       "micro_batch_size": 1, "lr": 1e-3, "train_windows": windows}]}
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_recipe(raw)


def test_on_policy_stages_take_no_train_windows():
    raw = {"teacher": "t", "plan": "all:window_gated_deltanet", "output_dir": "o",
           "stages": [{"name": "a", "kind": "on_policy", "tokens": 8, "seq_len": 8, "prompt_tokens": 4,
                       "new_tokens": 4, "global_batch_size": 1, "micro_batch_size": 1, "lr": 1e-3,
                       "train_windows": [4]}]}
    with pytest.raises(UserError, match="train_windows: applies to attention_output and kd stages"):
        parse_recipe(raw)
