"""A tiny converted hybrid on disk (real tokenizer, real conversion, conversion.json), to export and push."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hybridize.convert.init import TEACHER_CALIBRATED
from hybridize.convert.pipeline import convert_to_folder
from hybridize.teacher import teacher_folder


PLAN = ("mamba2:0 gated_deltanet:1 full_attention:2 sliding_attention:3 window_gated_deltanet:4 "
        "headwise_gated_deltanet:5 headwise_mamba2:6")


@pytest.fixture(scope="session")
def hybrid_dir(tmp_path_factory):
    """Converted with PLAN from a 7-layer Llama (hidden 64) over the real SmolLM2 vocabulary. The window + GDN layer's
    memory branch and the head-wise layers' GDN and Mamba2 heads are then opened (memory_scale 1, as distillation
    would move them), so the exported code's recurrent paths show in every logit; the Mamba2 and GDN layers' gates
    start open (the teacher-calibrated init; the default's zero gates would hide them)."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_folder(None))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=7,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=tokenizer.eos_token_id)
    root = tmp_path_factory.mktemp("publish")
    LlamaForCausalLM(config).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    folder = convert_to_folder(str(root / "teacher"), PLAN, root / "hybrid", options=TEACHER_CALIBRATED,
                               log=lambda *_: None)
    weights = folder / "model.safetensors"
    state = load_file(weights)
    for key in ("model.layers.4.mixer.memory_scale", "model.layers.5.mixer.memory_scale",
                "model.layers.6.mixer.memory_scale"):
        state[key] = torch.ones_like(state[key])
    save_file(state, weights, metadata={"format": "pt"})
    return folder
