"""One matmul for several projections of one input (mixers, MLP): the same outputs and gradients as separate calls."""

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from hybridize.model.mlp import GatedMLP
from hybridize.model.projections import FusedProjection, fusable, project


def _layers(bias_pattern):
    torch.manual_seed(0)
    return [nn.Linear(12, width, bias=bias, dtype=torch.float64) for width, bias in zip((8, 4, 4, 3), bias_pattern)]


def _check_against_separate(groups, x):
    fused = project(x, groups)
    separate = [torch.cat([layer(x) for layer in group], -1) for group in groups]
    assert [tuple(t.shape) for t in fused] == [tuple(t.shape) for t in separate]
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    params = [x, *(p for group in groups for layer in group for p in layer.parameters())]
    weights = [torch.randn_like(t) for t in separate]  # a random linear functional of every output
    grads_fused = torch.autograd.grad(sum((t * w).sum() for t, w in zip(fused, weights)), params)
    grads_separate = torch.autograd.grad(sum((t * w).sum() for t, w in zip(separate, weights)), params)
    for a, b in zip(grads_fused, grads_separate):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_plain_linears_match_separate_calls_with_and_without_biases():
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    for biases in [(False,) * 4, (True,) * 4, (True, False, True, False)]:
        q, k, v, a = _layers(biases)
        _check_against_separate([(q, k, v), (a,)], x)
        _check_against_separate([(q,), (k,), (v,), (a,)], x)


def test_joined_outputs_start_every_row_on_a_128_byte_boundary():
    """Widths 8 + 4 + 4 + 3 = 19: the joined GEMM writes rows of 64 (zero weights in the last 45, dropped), so neither
    cuBLAS nor torch.compile meets an unaligned row; the groups are views of that [..., 64] output, for training and
    the decoder alike."""
    q, k, v, a = _layers((True, False, True, False))
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    fused = FusedProjection([(q, k, v), (a,)])
    assert fused.weight.shape == (64, 12) and fused.bias.shape == (64,)
    for outputs in (project(x, [(q, k, v), (a,)]), fused(x)):
        assert [t.shape[-1] for t in outputs] == [16, 3]
        assert all(t.stride(-2) == 64 for t in outputs)


def test_without_gradients_the_same_outputs():
    q, k, v, a = _layers((True, False, True, False))
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    with torch.no_grad():
        unfused = project(x, [(q, k, v), (a,)])
    for got, want in zip(unfused, project(x, [(q, k, v), (a,)])):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_lora_wrapped_projection_keeps_its_adapter():
    holder = nn.Module()
    holder.q_proj, holder.k_proj, holder.v_proj, _ = _layers((False,) * 4)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), holder)
    x = torch.randn(3, 12, dtype=torch.float64)
    q, k, v = project(x, [(holder.q_proj,), (holder.k_proj,), (holder.v_proj,)])
    torch.testing.assert_close(q, holder.q_proj(x))
    assert not torch.allclose(q, holder.q_proj.base_layer(x)), "the adapter must change q, or this test shows nothing"
    torch.testing.assert_close(k, holder.k_proj(x))


def test_gated_mlp_equals_llama_mlp_with_the_same_weights():
    config = LlamaConfig(hidden_size=12, intermediate_size=20, num_attention_heads=2, num_key_value_heads=2,
                         hidden_act="silu", mlp_bias=False)
    torch.manual_seed(0)
    ours, theirs = GatedMLP(config).double(), LlamaMLP(config).double()
    assert ours.load_state_dict(theirs.state_dict()).missing_keys == []
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


def test_a_fused_projection_gives_projects_outputs_and_follows_refreshed_weights():
    """One GEMM over weights concatenated once (the static decoder's): the same outputs as project(), with mixed
    biases; the weights are a copy, so a change to a layer shows only after refresh()."""
    q, k, v, a = _layers((True, False, True, False))
    groups = [(q, k, v), (a,)]
    fused = FusedProjection(groups)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    with torch.no_grad():
        for got, want in zip(fused(x), project(x, groups), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        k.weight.add_(1.0)
        q.bias.mul_(-2.0)
        stale = fused(x)[0]
        fused.refresh()
        fresh, want = fused(x)[0], project(x, groups)[0]
    assert not torch.allclose(stale, want), "the copy must not follow the layers before refresh()"
    torch.testing.assert_close(fresh, want, rtol=1e-12, atol=1e-12)


def test_a_lora_wrapped_projection_is_not_fused():
    holder = nn.Module()
    holder.q_proj, holder.k_proj, _, _ = _layers((False,) * 4)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), holder)
    assert fusable([(holder.k_proj,)]) and not fusable([(holder.q_proj,), (holder.k_proj,)])
    with pytest.raises(ValueError, match="plain nn.Linear"):
        FusedProjection([(holder.q_proj,), (holder.k_proj,)])
