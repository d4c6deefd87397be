"""A tiny converted hybrid on disk (real tokenizer, real conversion, conversion.json), to export and push."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hybridize.convert.io import convert_to_folder
from hybridize.teacher import teacher_folder


@pytest.fixture(scope="session")
def hybrid_dir(tmp_path_factory):
    """Converted with plan h2:1 from a 4-layer Llama (hidden 64) over the real SmolLM2 vocabulary."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_folder(None))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=tokenizer.eos_token_id)
    root = tmp_path_factory.mktemp("publish")
    LlamaForCausalLM(config).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    return convert_to_folder(str(root / "teacher"), "h2:1", root / "hybrid", log=lambda *_: None)
