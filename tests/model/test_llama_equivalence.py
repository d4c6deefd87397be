"""An all-attention hybrid reproduces LlamaForCausalLM logits (tiny random configs and the real SmolLM2 teacher)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybridize.convert.build import convert_model

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
CONFIGS = {
    "gqa_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "head_dim_24": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24),
    "llama3_rope_scaling": dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
    "linear_rope_scaling": dict(num_attention_heads=4, num_key_value_heads=2,
                                rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_all_attention_hybrid_matches_llama(name):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                         max_position_embeddings=128, **CONFIGS[name])
    teacher = LlamaForCausalLM(config).eval()
    hybrid = convert_model(teacher, ["full_attention"] * 3)
    input_ids = torch.randint(0, 101, (2, 75))
    with torch.no_grad():
        expected, actual = teacher(input_ids).logits, hybrid(input_ids, use_cache=False).logits
    assert (actual - expected).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_all_attention_hybrid_matches_smollm2(smollm2):
    teacher, tokenizer = smollm2
    hybrid = convert_model(teacher, ["full_attention"] * teacher.config.num_hidden_layers)
    input_ids = tokenizer("def fibonacci(n):\n    if n < 2:\n        return n\n", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, actual = teacher(input_ids).logits, hybrid(input_ids, use_cache=False).logits
    assert (actual - expected).abs().max().item() <= 1e-4
