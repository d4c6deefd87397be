"""Head-wise layers from attention: the kept KV heads' weights copied exactly, the other heads through the GDN or
Mamba2 mapping, and at step 0 the teacher with the replaced heads' outputs removed."""

import pytest
import torch
from transformers import LlamaForCausalLM

from hybridize.convert.build import convert_state, hybrid_config_from_teacher, model_from_state
from hybridize.convert.init import (
    InitOptions, attention_to_headwise_gated_deltanet, attention_to_headwise_mamba2, repeat_heads,
)

from test_init import TEACHER, attention_weights

KEPT = {"0": [1], "2": [0]}  # layer 0 keeps its second KV head, so a split that ignored the choice would show


def plan(kind):
    return [kind, "full_attention", kind, "full_attention"]


def assert_kept_heads_copied(out, q, k, v, o):
    """KV head 1 (query heads 2, 3: rows 16-31 of q, 8-15 of k and v, o_proj columns 16-31) is the kept attention."""
    assert torch.equal(out["window.q_proj.weight"], q[16:])
    assert torch.equal(out["window.k_proj.weight"], k[8:]) and torch.equal(out["window.v_proj.weight"], v[8:])
    assert torch.equal(out["window.o_proj.weight"], o[:, 16:])


def test_headwise_mapping_copies_the_kept_heads_and_maps_the_others_to_gdn_heads():
    """TEACHER: 4 query heads of dim 8 over 2 KV heads. Layer 0 keeps KV head 1 (query heads 2, 3) as attention;
    query heads 0, 1 (KV head 0) become GDN heads."""
    attn = attention_weights()
    config = hybrid_config_from_teacher(TEACHER, plan("headwise_gated_deltanet"), headwise_kv_heads=KEPT)
    out = attention_to_headwise_gated_deltanet(attn, config, InitOptions(), torch.Generator().manual_seed(0),
                                               layer_idx=0)
    q, k, v, o = (attn[f"{name}.weight"] for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert_kept_heads_copied(out, q, k, v, o)
    assert torch.equal(out["memory.q_proj.weight"], q[:16])
    assert torch.equal(out["memory.k_proj.weight"], repeat_heads(k[:8], 1, 8, 2))
    assert torch.equal(out["memory.v_proj.weight"], repeat_heads(v[:8], 1, 8, 2))
    assert torch.equal(out["memory.o_proj.weight"], o[:, :16])
    # gate "zero" becomes the teacher gate (W_v): the heads are held at zero by memory_scale already
    assert torch.equal(out["memory.g_proj.weight"], out["memory.v_proj.weight"])
    assert out["memory.A_log"].shape == (2,) and torch.equal(out["memory_scale"], torch.zeros(32))


def test_headwise_mapping_copies_the_kept_heads_and_maps_the_others_to_mamba2_heads():
    """As above with Mamba2 heads: query heads 0, 1 (KV head 0) give C, KV head 0 gives B and x (repeated to both
    query heads, each Mamba2 head with its own B and C), and their o_proj columns the out projection; D = 0."""
    attn = attention_weights()
    config = hybrid_config_from_teacher(TEACHER, plan("headwise_mamba2"), headwise_kv_heads=KEPT)
    out = attention_to_headwise_mamba2(attn, config, InitOptions(), torch.Generator().manual_seed(0), layer_idx=0)
    q, k, v, o = (attn[f"{name}.weight"] for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert_kept_heads_copied(out, q, k, v, o)
    assert torch.equal(out["memory.C_proj.weight"], q[:16])
    assert torch.equal(out["memory.B_proj.weight"], repeat_heads(k[:8], 1, 8, 2))
    assert torch.equal(out["memory.x_proj.weight"], repeat_heads(v[:8], 1, 8, 2))
    assert torch.equal(out["memory.out_proj.weight"], o[:, :16])
    assert torch.equal(out["memory.z_proj.weight"], out["memory.x_proj.weight"])  # the teacher gate, as for GDN
    assert torch.equal(out["memory.D"], torch.zeros(2)) and out["memory.conv_weight"].shape == (3 * 16, 4)
    assert torch.equal(out["memory_scale"], torch.zeros(32))


@pytest.mark.parametrize("kind", ["headwise_gated_deltanet", "headwise_mamba2"])
def test_converted_headwise_model_equals_the_teacher_without_the_replaced_heads(kind):
    """At step 0 (memory_scale = 0) the converted model is the teacher whose replaced query heads output zero before
    o_proj: equal to fp64 round-off (the sums over heads run in another order); opening the recurrent heads changes
    it."""
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(TEACHER).double().eval()
    state = teacher.state_dict()
    config = hybrid_config_from_teacher(TEACHER, plan(kind), dtype=torch.float64, headwise_kv_heads=KEPT)
    hybrid = model_from_state(config, convert_state(list(state), state.__getitem__, config, InitOptions(), seed=0)[0])

    def drop_heads(replaced_query_heads):
        def hook(module, args):
            heads = args[0].view(*args[0].shape[:-1], 4, 8).clone()
            heads[..., replaced_query_heads, :] = 0
            return (heads.flatten(-2),)
        return hook

    handles = [teacher.model.layers[0].self_attn.o_proj.register_forward_pre_hook(drop_heads([0, 1])),
               teacher.model.layers[2].self_attn.o_proj.register_forward_pre_hook(drop_heads([2, 3]))]
    ids = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        expected = teacher(ids).logits
        for handle in handles:
            handle.remove()
        full_teacher = teacher(ids).logits
        got = hybrid(ids, use_cache=False).logits
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
        assert (got - full_teacher).abs().max() > 1e-3  # the dropped heads mattered
        hybrid.model.layers[0].mixer.memory_scale.fill_(1.0)
        assert (hybrid(ids, use_cache=False).logits - expected).abs().max() > 1e-3
