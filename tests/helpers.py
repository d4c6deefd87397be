"""Test utilities shared by every test module (imported as `helpers`; pytest puts tests/ on sys.path)."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybridize.model import HybridConfig, HybridForCausalLM
from hybridize.model.configuration_hybrid import BRANCH_TYPES, HEADWISE_TYPES
from hybridize.model.mamba2 import Mamba2Mixer

REPO = Path(__file__).resolve().parents[1]
CUDA_TEST = "needs a CUDA GPU"  # the skip reason that marks a CUDA test (conftest refuses to run one interpreted)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_TEST)


def load_script(path: Path) -> ModuleType:
    """A script that is not part of the package (scripts/*.py), imported from its file under its file name."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python scripts/NAME ARGS...` from the repository root, as a user runs it, its output captured."""
    return subprocess.run([sys.executable, f"scripts/{name}", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def interpreted_cuda_test(item: pytest.Item) -> bool:
    """Whether `item` is a CUDA test (helpers.requires_cuda) about to run on a GPU with TRITON_INTERPRET=1."""
    cuda_test = any(mark.kwargs.get("reason") == CUDA_TEST for mark in item.iter_markers("skipif"))
    return cuda_test and os.environ.get("TRITON_INTERPRET") == "1" and torch.cuda.is_available()


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """bf16 values held as their uint16 bits -> fp32, exactly (a bf16 is an fp32 with the low 16 bits zero)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits, rounded to nearest even, as the GPU's conversion rounds (NaN stays a quiet NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), ((bits >> 16) | np.uint32(0x40)).astype(np.uint16), rounded)


def rel_rmse(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Root-mean-square error of `actual`, relative to the RMS of `expected` (both taken in fp64)."""
    a, e = actual.double(), expected.double()
    return ((a - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_rel_rmse(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: NaN/inf (unwritten or overflowed output)"
    err = rel_rmse(actual, expected)
    assert err <= tol, f"{name}: relative RMSE {err:.2e} > {tol:.0e}"


# The intra-layer types: an attention branch and a recurrent branch summed in one mixer (window + memory, head-wise).
# Read from the config's table, so a type added there is tested wherever these are.
INTRA_LAYER_TYPES = list(BRANCH_TYPES)


def intra_layer_options(layer_types: list[str], windowed: bool, kv_heads: int) -> dict:
    """HybridConfig options for the intra-layer layers of `layer_types`. windowed=False: memories over every token,
    head-wise attention heads over the whole sequence (keeping the default first KV head); True: memories over the
    tokens that have left the window, head-wise attention heads in the window with its sinks, keeping the last of
    the `kv_heads` KV heads instead."""
    kept = {str(i): [kv_heads - 1] for i, kind in enumerate(layer_types) if kind in HEADWISE_TYPES}
    return dict(memory_outside_window=windowed, headwise_window=windowed, headwise_kv_heads=kept if windowed else None)


@torch.no_grad()
def open_mamba2_states(model) -> None:
    """Make every Mamba2 mixer's state reach its output: dt near 1, decays whose half-lives span 1.4 to 14 tokens, and
    B, C projections 8x their init. At a random init its writes x dt (dt ~ 0.01) and reads C.S are so small that the
    state carries about 1e-5 of the mixer's output (the D skip carries the rest), so a frozen or misplaced state
    would change no token and pass any test of the cache paths."""
    for memory in model.modules():
        if isinstance(memory, Mamba2Mixer):
            memory.dt_bias.fill_(math.log(math.e - 1))  # softplus(dt_bias) = 1
            memory.A_log.copy_(torch.linspace(math.log(0.05), math.log(0.5), memory.num_heads))  # ln 2 / A tokens
            memory.B_proj.weight.mul_(8)
            memory.C_proj.weight.mul_(8)


@torch.no_grad()
def open_memory_branches(model, seed: int = 0) -> None:
    """Make every intra-layer layer's memory branch, and the state it carries, reach the output.

    memory_scale [C] gets random values: conversion starts it at zero, which hides the branch and all its gradients,
    and a config at one, which hides what the scale does per channel. Mamba2 memories get open states
    (open_mamba2_states).
    """
    generator = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        if layer.layer_type in BRANCH_TYPES:
            scale = layer.mixer.memory_scale
            scale.copy_(torch.randn(scale.shape, generator=generator))
    open_mamba2_states(model)


def intra_layer_model(windowed: bool) -> HybridForCausalLM:
    """A tiny fp32 model of every intra-layer type (intra_layer_options' `windowed`), GQA 4:2, an 8-token window with
    2 sinks, 16-token chunks, open memory branches."""
    torch.manual_seed(0)
    config = HybridConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=len(INTRA_LAYER_TYPES), num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, layer_types=INTRA_LAYER_TYPES, sliding_window=8, sliding_window_sinks=2,
                          mamba_chunk_size=16, gdn_chunk_size=16, max_position_embeddings=256,
                          **intra_layer_options(INTRA_LAYER_TYPES, windowed, kv_heads=2))
    model = HybridForCausalLM(config)
    open_memory_branches(model)
    return model


def save_tiny_teacher(folder, tokenizer, layers: int, max_positions: int):
    """A Llama of `layers` layers (hidden 64, GQA 4:2) over the real tokenizer's vocabulary, saved like any HF model
    with its tokenizer beside it; random weights from seed 0."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
