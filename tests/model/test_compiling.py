"""Compiled decoder layers (distillation's KD stages on GPU) compute what the eager layers compute, gradients too."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybridize.convert.build import convert_model
from hybridize.model.compiling import compile_decoder_layers

LAYER_TYPES = ["full_attention", "gated_deltanet", "sliding_attention", "mamba2", "gated_deltanet", "full_attention"]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=len(LAYER_TYPES),
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def loss_and_grads(model, input_ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, use_cache=False).logits.float().pow(2).mean()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["hybrid", "llama"])
def test_compiled_layers_match_eager(teacher, kind):
    eager = convert_model(teacher, LAYER_TYPES, sink_tokens=2) if kind == "hybrid" else copy.deepcopy(teacher)
    if kind == "hybrid":
        window = eager.model.layers[2].mixer
        assert window.sinks == 2
        window.window = 16  # shorter than the sequence, so the window masks something
    eager.train()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_decoder_layers(compiled, backend="aot_eager")
    input_ids = torch.randint(0, 128, (2, 48))
    expected_loss, expected = loss_and_grads(eager, input_ids)
    for _ in range(2):  # the second pass reuses the graphs
        loss, grads = loss_and_grads(compiled, input_ids)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
        for name, grad in expected.items():
            assert grads[name] is not None, f"{name}: no gradient through the compiled layer"
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
