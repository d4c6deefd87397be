"""Each initializer maps attention weights where the docs say, and every teacher tensor is consumed or dropped."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hybridize.convert.build import convert_model, convert_state, hybrid_config_from_teacher, model_from_state
from hybridize.convert.init import (
    InitOptions, attention_to_attention, attention_to_gated_deltanet, attention_to_mamba2, repeat_heads,
)
from hybridize.errors import UserError

TEACHER = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def attention_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"q_proj.weight": torch.randn(32, 32, generator=g), "k_proj.weight": torch.randn(16, 32, generator=g),
            "v_proj.weight": torch.randn(16, 32, generator=g), "o_proj.weight": torch.randn(32, 32, generator=g)}


def config_for(kind):
    return hybrid_config_from_teacher(TEACHER, [kind] * 4)


def test_repeat_heads_expands_each_kv_head_to_its_query_group():
    w = torch.arange(2 * 3 * 5.0).view(6, 5)  # 2 heads of dim 3
    out = repeat_heads(w, num_heads=2, head_dim=3, times=2)
    assert torch.equal(out.view(4, 3, 5)[0], w[:3]) and torch.equal(out.view(4, 3, 5)[1], w[:3])
    assert torch.equal(out.view(4, 3, 5)[2], w[3:]) and torch.equal(out.view(4, 3, 5)[3], w[3:])


def test_attention_copy_for_full_and_sliding():
    attn = attention_weights()
    out = attention_to_attention(attn, config_for("sliding_attention"), InitOptions(), torch.Generator())
    assert out.keys() == attn.keys() and all(torch.equal(out[k], attn[k]) for k in attn)


def test_mamba2_mapping():
    attn, config = attention_weights(), config_for("mamba2")
    out = attention_to_mamba2(attn, config, InitOptions(), torch.Generator().manual_seed(0))
    assert torch.equal(out["C_proj.weight"], attn["q_proj.weight"])
    assert torch.equal(out["B_proj.weight"], repeat_heads(attn["k_proj.weight"], 2, 8, 2))
    assert torch.equal(out["x_proj.weight"], repeat_heads(attn["v_proj.weight"], 2, 8, 2))
    assert torch.equal(out["out_proj.weight"], attn["o_proj.weight"])
    assert torch.equal(out["D"], torch.zeros(4)) and torch.equal(out["z_proj.weight"], torch.zeros(32, 32))
    # identity conv: only the newest tap is 1; slow decay: a = exp(-softplus(dt_bias)) with dt = 0.01, A = 1
    assert torch.equal(out["conv_weight"][:, -1], torch.ones(96)) and not out["conv_weight"][:, :-1].any()
    decay = torch.exp(-torch.exp(out["A_log"]) * F.softplus(out["dt_bias"]))
    torch.testing.assert_close(decay, torch.full((4,), torch.exp(torch.tensor(-0.01)).item()))


def test_gated_deltanet_mapping():
    attn, config = attention_weights(), config_for("gated_deltanet")
    out = attention_to_gated_deltanet(attn, config, InitOptions(gate="random", conv="random", decay="random"),
                                      torch.Generator().manual_seed(0))
    assert torch.equal(out["q_proj.weight"], attn["q_proj.weight"])
    assert torch.equal(out["k_proj.weight"], repeat_heads(attn["k_proj.weight"], 2, 8, 2))
    assert torch.equal(out["v_proj.weight"], repeat_heads(attn["v_proj.weight"], 2, 8, 2))
    assert torch.equal(out["o_proj.weight"], attn["o_proj.weight"])
    assert not out["b_proj.weight"].any() and not out["a_proj.weight"].any()  # beta = 1/2, data-independent decay
    assert out["g_proj.weight"].std() > 0 and out["conv_weight"][:, :-1].abs().sum() > 0
    assert 1 <= torch.exp(out["A_log"]).min() and torch.exp(out["A_log"]).max() <= 16


def test_mapping_refuses_head_dims_it_cannot_serve():
    config = hybrid_config_from_teacher(TEACHER, ["gated_deltanet"] * 4, gdn_head_v_dim=16)
    with pytest.raises(UserError, match="gated_deltanet init from attention needs"):
        attention_to_gated_deltanet(attention_weights(), config, InitOptions(), torch.Generator())


def test_every_teacher_tensor_is_consumed_or_dropped():
    teacher = LlamaForCausalLM(TEACHER)
    teacher_state = teacher.state_dict()
    config = hybrid_config_from_teacher(TEACHER, ["mamba2", "full_attention", "gated_deltanet", "sliding_attention"])
    state, dropped = convert_state(list(teacher_state), teacher_state.__getitem__, config, InitOptions(), seed=0)
    assert dropped == {}  # untied embeddings, no persistent RoPE buffer
    hybrid = convert_model(teacher, config.layer_types)
    assert set(state) == set(hybrid.state_dict())
    extra = {**teacher_state, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)}
    with pytest.raises(UserError, match="teacher tensors with no mapping: model.layers.0.self_attn.q_norm.weight"):
        convert_state(list(extra), extra.__getitem__, config, InitOptions(), seed=0)


def test_tied_lm_head_is_dropped_with_reason():
    config = LlamaConfig(**{**TEACHER.to_dict(), "tie_word_embeddings": True})
    teacher_state = LlamaForCausalLM(config).state_dict()
    hybrid_config = hybrid_config_from_teacher(config, ["gated_deltanet"] * 4)
    keys = list(teacher_state) + ["lm_head.weight"] * ("lm_head.weight" not in teacher_state)
    read = lambda k: teacher_state.get(k, teacher_state["model.embed_tokens.weight"])  # noqa: E731
    _, dropped = convert_state(keys, read, hybrid_config, InitOptions(), seed=0)
    assert dropped == {"lm_head.weight": "tied to model.embed_tokens.weight"}


def test_attention_biases_cannot_go_into_recurrent_layers():
    config = LlamaConfig(**{**TEACHER.to_dict(), "attention_bias": True})
    teacher_state = LlamaForCausalLM(config).state_dict()
    with pytest.raises(UserError, match="attention biases have no place in a mamba2 layer"):
        convert_state(list(teacher_state), teacher_state.__getitem__,
                      hybrid_config_from_teacher(config, ["mamba2"] * 4), InitOptions(), seed=0)


def test_bad_init_option_is_named():
    with pytest.raises(UserError, match="init option gate='one'; allowed: zero, random"):
        InitOptions(gate="one")


@pytest.mark.parametrize("kind, memory", [("window_gated_deltanet", attention_to_gated_deltanet),
                                          ("window_mamba2", attention_to_mamba2)])
def test_window_memory_mapping_copies_the_window_and_reuses_the_memory_mapping(kind, memory):
    """window.* is the attention, memory.* is what the recurrent mapping gives (a zero gate becomes W_v: the memory is
    held at zero by memory_scale already), memory_scale is zero."""
    attn = attention_weights()
    out = attention_to_window_memory(kind, attn, config_for(kind))
    assert all(torch.equal(out[f"window.{k}"], attn[k]) for k in attn)
    want = memory(attn, config_for(kind), InitOptions(gate="teacher"), torch.Generator().manual_seed(0))
    assert {k[len("memory."):] for k in out if k.startswith("memory.")} == want.keys()
    assert all(torch.equal(out[f"memory.{k}"], v) for k, v in want.items())
    assert torch.equal(out["memory_scale"], torch.zeros(32))


def attention_to_window_memory(kind, attn, config):
    from hybridize.convert.init import INITIALIZERS

    return INITIALIZERS[kind](attn, config, InitOptions(), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["window_gated_deltanet", "window_mamba2"])
def test_converted_window_memory_model_equals_the_window_plan(kind):
    """At step 0 a window + memory layer is exactly its sliding window: the converted model's logits equal those of
    the same plan with sliding_attention, bit for bit; opening the memory then changes them."""
    torch.manual_seed(0)
    teacher_state = LlamaForCausalLM(TEACHER).state_dict()

    def converted(plan):  # an 8-token window with a sink, shorter than the sequence, so the window drops keys
        config = hybrid_config_from_teacher(TEACHER, plan, sliding_window=8, sliding_window_sinks=1)
        state, _ = convert_state(list(teacher_state), teacher_state.__getitem__, config, InitOptions(), seed=0)
        return model_from_state(config, state)

    hybrid = converted(["full_attention", kind, kind, "full_attention"])
    window = converted(["full_attention", "sliding_attention", "sliding_attention", "full_attention"])
    ids = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        expected = window(ids, use_cache=False).logits
        assert torch.equal(hybrid(ids, use_cache=False).logits, expected)
        hybrid.model.layers[1].mixer.memory_scale.fill_(1.0)
        assert (hybrid(ids, use_cache=False).logits - expected).abs().max() > 1e-3


def test_attention_biases_cannot_go_into_window_memory_layers():
    config = LlamaConfig(**{**TEACHER.to_dict(), "attention_bias": True})
    teacher_state = LlamaForCausalLM(config).state_dict()
    with pytest.raises(UserError, match="attention biases have no place in a window_gated_deltanet layer"):
        convert_state(list(teacher_state), teacher_state.__getitem__,
                      hybrid_config_from_teacher(config, ["window_gated_deltanet"] * 4), InitOptions(), seed=0)
