"""Compiled decoder layers (distillation's KD stages on GPU) compute what the eager layers compute, gradients too."""

import copy

import pytest
import torch
from helpers import intra_layer_model
from transformers import LlamaConfig, LlamaForCausalLM

from hybridize.convert.build import convert_model
from hybridize.model import ops
from hybridize.model.compiling import compile_decoder_layers

LAYER_TYPES = ["full_attention", "gated_deltanet", "sliding_attention", "mamba2", "gated_deltanet", "full_attention"]
# The chunked ops are graph breaks by design (model/ops.py); a break anywhere else splits a layer's graph further.
CHUNKED_OPS = [ops.causal_conv1d, ops.chunk_gated_delta_rule, ops.chunk_ssd]  # as dynamo names them: the wrappers


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=len(LAYER_TYPES),
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def eager_model(kind: str, teacher):
    if kind == "llama":
        return copy.deepcopy(teacher)
    if kind == "hybrid":
        model = convert_model(teacher, LAYER_TYPES, sink_tokens=2)
        window = model.model.layers[2].mixer
        assert window.sinks == 2
        window.window = 16  # shorter than the sequence, so the window masks something
        return model
    return intra_layer_model(windowed=kind == "intra_layer_windowed")


def loss_and_grads(model, input_ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, use_cache=False).logits.float().pow(2).mean()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def graph_breaks_outside_chunked_ops() -> list[str]:
    reasons = torch._dynamo.utils.counters["graph_break"]
    return [reason for reason in reasons if not any(repr(op) in reason for op in CHUNKED_OPS)]


@pytest.mark.parametrize("kind", ["hybrid", "llama", "intra_layer", "intra_layer_windowed"])
def test_compiled_layers_match_eager(teacher, kind):
    """intra_layer: window + memory layers whose memories read every token, head-wise layers whose attention heads
    see the whole sequence; intra_layer_windowed: memories that read only what has left the window, head-wise
    attention heads in the window. 37 tokens: odd, three 16-token chunks, past the 8-token window and its sinks."""
    eager = eager_model(kind, teacher)
    eager.train()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_decoder_layers(compiled, backend="aot_eager")
    input_ids = torch.randint(0, 128, (2, 37))
    expected_loss, expected = loss_and_grads(eager, input_ids)
    for _ in range(2):  # the second pass reuses the graphs
        loss, grads = loss_and_grads(compiled, input_ids)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
        for name, grad in expected.items():
            assert grads[name] is not None, f"{name}: no gradient through the compiled layer"
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    unexpected = graph_breaks_outside_chunked_ops()
    assert not unexpected, "\n\n".join(unexpected)
