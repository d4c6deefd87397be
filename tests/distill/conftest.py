"""Shared fixtures for the distillation tests: a tiny Llama teacher and its converted hybrid on disk, text, recipes."""

import json
from pathlib import Path

import pytest
import torch
from distill_support import TINY_LAYER_TYPES, TINY_WINDOW
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hybridize.convert.build import convert_model
from hybridize.corpus import documents
from hybridize.teacher import teacher_folder


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (vocabulary 49152), so the tiny models read real text."""
    return AutoTokenizer.from_pretrained(teacher_folder("smollm2-135m"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer) -> Path:
    """{root}/teacher: a random tiny Llama; {root}/init: its hybrid for TINY_LAYER_TYPES; both with the tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=len(TINY_LAYER_TYPES),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, max_position_embeddings=1024,
        initializer_range=0.1,  # sharper than the default 0.02, so that the student's errors show in the KL
    )
    teacher = LlamaForCausalLM(config)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    student = convert_model(teacher, TINY_LAYER_TYPES)
    student.save_pretrained(root / "init")
    tokenizer.save_pretrained(root / "init")
    saved = json.loads((root / "init" / "config.json").read_text())
    saved["sliding_window"] = TINY_WINDOW
    (root / "init" / "config.json").write_text(json.dumps(saved))
    return root


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A jsonl file of 40 real documents (stdlib code and KJV prose), read through `datasets`."""
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    picked = list(documents("code", "train")[:20]) + list(documents("prose", "train")[:20])
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in picked))
    return path
