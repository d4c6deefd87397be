"""Per-KV-head scores: the relative attention-output error of dropping a KV head's query heads, and the choice of the
heads a head-wise layer keeps; `analyze --heads K` writes them into a plan that `convert` takes."""

import json

import pytest
import torch

from hybridize.analyze.heads import choose_kv_heads, headwise_plan, kv_head_scores
from hybridize.cli import main

HEAD_DIM, GROUP = 16, 2  # tiny_config: 4 query heads of dim 16 over 2 KV heads


def _columns(kv_head: int) -> slice:
    return slice(kv_head * GROUP * HEAD_DIM, (kv_head + 1) * GROUP * HEAD_DIM)


def test_the_kv_head_that_carries_the_output_scores_higher_and_stays_attention(tiny_teacher):
    """Layer 0: KV head 1's o_proj columns x 20, so its heads carry the output; layer 1: KV head 0's columns zero, so
    dropping it costs nothing. The choice keeps KV head 1 in both."""
    with torch.no_grad():
        tiny_teacher.model.layers[0].self_attn.o_proj.weight[:, _columns(1)] *= 20
        tiny_teacher.model.layers[1].self_attn.o_proj.weight[:, _columns(0)] = 0
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    scores = kv_head_scores(tiny_teacher, ids, [0, 1])
    assert scores[0][1] > 0.9 > 0.1 > scores[0][0]
    assert scores[1] == [0.0, 1.0]
    assert choose_kv_heads(scores, 1) == {"0": [1], "1": [1]}


def test_a_score_is_the_error_of_the_attention_output_without_those_heads(tiny_teacher):
    """Measured directly: layer 2's attention output with KV head 0's query heads zeroed before o_proj, against the
    intact output, over both blocks."""
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    attention = tiny_teacher.model.layers[2].self_attn
    outputs = {}

    def record(name):
        def hook(module, args, output):
            outputs.setdefault(name, []).append(output[0])
        return hook

    def drop_head_zero(module, args):
        x = args[0].clone()
        x[..., _columns(0)] = 0
        return (x,)

    with torch.no_grad():
        handle = attention.register_forward_hook(record("intact"))
        for block in ids:
            tiny_teacher(block[None])
        handle.remove()
        handles = [attention.register_forward_hook(record("dropped")),
                   attention.o_proj.register_forward_pre_hook(drop_head_zero)]
        for block in ids:
            tiny_teacher(block[None])
        for handle in handles:
            handle.remove()
    intact, dropped = torch.cat(outputs["intact"]), torch.cat(outputs["dropped"])
    expected = ((dropped - intact).norm() / intact.norm()).item()
    assert abs(kv_head_scores(tiny_teacher, ids, [2])[2][0] - expected) < 1e-5  # fp32 sums over 48 x 64 values


@pytest.mark.parametrize("mixer, headwise", [("gated_deltanet", "headwise_gated_deltanet"),
                                             ("mamba2", "headwise_mamba2")])
def test_analyze_heads_writes_a_headwise_plan_that_convert_takes(mixer, headwise, tiny_llama, tmp_path, capsys):
    """--mixers names the recurrent mixer; with --heads every replaced layer becomes that mixer's head-wise type."""
    out = tmp_path / "plan"
    assert main(["analyze", str(tiny_llama), "--device", "cpu", "--fast", "--budget", "1", "--heads", "1",
                 "--seq-len", "64", "--mixers", mixer, "--out", str(out)]) == 0
    record = json.loads((out / "plan.json").read_text())
    replaced = [i for i, kind in enumerate(record["layer_types"]) if kind != "full_attention"]
    assert len(replaced) == 3 and {record["layer_types"][i] for i in replaced} == {headwise}
    kept = record["headwise_kv_heads"]
    assert set(kept) == {str(i) for i in replaced}
    for i in replaced:
        scores = record["layers"][i]["kv_head_scores"]
        assert kept[str(i)] == [max(range(2), key=scores.__getitem__)]
    capsys.readouterr()
    assert main(["convert", str(tiny_llama), "--plan", str(out / "plan.json"), "--out", str(tmp_path / "h")]) == 0
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["headwise_kv_heads"] == kept and config["layer_types"] == record["layer_types"]


def test_headwise_layers_take_the_recurrent_mixer_chosen_for_the_layer():
    """Each replaced layer's recurrent heads follow its chosen type (a memory branch counts); a sliding window takes
    Gated DeltaNet unless the allowed mixers hold only Mamba2."""
    chosen = ["full_attention", "mamba2", "gated_deltanet", "window_mamba2", "window_gated_deltanet",
              "sliding_attention"]
    every = ("mamba2", "gated_deltanet", "sliding_attention", "window_gated_deltanet", "window_mamba2")
    assert headwise_plan(chosen, every) == [
        "full_attention", "headwise_mamba2", "headwise_gated_deltanet", "headwise_mamba2", "headwise_gated_deltanet",
        "headwise_gated_deltanet"]
    windows = ["full_attention", "sliding_attention"]
    assert headwise_plan(windows, ("window_mamba2", "sliding_attention"))[1] == "headwise_mamba2"
    mixed = ("mamba2", "window_gated_deltanet", "sliding_attention")
    assert headwise_plan(windows, mixed)[1] == "headwise_gated_deltanet"
    assert headwise_plan(windows, ("sliding_attention",))[1] == "headwise_gated_deltanet"


def test_heads_must_keep_some_but_not_all(tiny_llama, tmp_path, capsys):
    capsys.readouterr()
    code = main(["analyze", str(tiny_llama), "--device", "cpu", "--fast", "--budget", "1", "--heads", "2",
                 "--seq-len", "64", "--mixers", "gated_deltanet", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and "--heads must keep at least one and fewer than all of the teacher's 2 KV heads" in err
    assert not (tmp_path / "p").exists()
