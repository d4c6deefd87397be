"""Tiny Llama teachers for the analyzer tests: one saved with the real SmolLM2 tokenizer, one in memory."""

import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybridize.teacher import teacher_folder


def tiny_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                       eos_token_id=2, bos_token_id=1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A saved 4-layer Llama with the real SmolLM2 tokenizer, so calibration text tokenizes as in practice."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(49152)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(teacher_folder(None) / name, folder / name)
    return folder


@pytest.fixture()
def tiny_teacher():
    """An in-memory 4-layer Llama with a small vocabulary, for function-level tests."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(256)).eval()
