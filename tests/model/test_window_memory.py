"""Window + memory layers: what the memory branch reads, with and without memory_outside_window."""

import pytest
import torch

from hybridize.model import HybridConfig, HybridForCausalLM
from hybridize.model.context import SequenceContext

WINDOW, LENGTH, QUERY = 8, 24, 23  # the query's window is tokens 16..23; its conv also reads 20..22


def memory_branch(kind: str, outside: bool):
    torch.manual_seed(0)
    config = HybridConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, layer_types=[kind], sliding_window=WINDOW,
                          mamba_chunk_size=16, gdn_chunk_size=16, memory_outside_window=outside)
    return HybridForCausalLM(config).double().eval().model.layers[0].mixer.memory


def change_at_query(memory, slot: int) -> float:
    """How much the memory's output at QUERY moves when the input at `slot` changes."""
    hidden = torch.randn(1, LENGTH, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    changed = hidden.clone()
    changed[0, slot] += 1.0
    context = SequenceContext(position_embeddings=None, attention_mask=None, past_tokens=0)
    with torch.no_grad():
        return (memory(changed, context) - memory(hidden, context))[0, QUERY].abs().max().item()


@pytest.mark.parametrize("kind", ["window_gated_deltanet", "window_mamba2"])
def test_an_outside_window_memory_reads_only_what_has_left_the_window(kind):
    """By default the memory reads every token so far, those in the window too; with memory_outside_window a token
    inside the window (but older than the query's own conv taps) does not reach it, while tokens up to
    QUERY - WINDOW still do."""
    default, outside = memory_branch(kind, False), memory_branch(kind, True)
    inside = 17  # in the window, before the conv's reach
    assert change_at_query(default, inside) > 1e-12  # fp64: an unread token changes the output by exactly 0
    assert change_at_query(outside, inside) == 0.0
    for left in (QUERY - WINDOW, 3):  # the newest token outside the window, and an old one
        assert change_at_query(outside, left) > 1e-12
    assert change_at_query(outside, QUERY) > 1e-4  # the query itself


def test_the_option_keeps_the_parameters():
    """The same weights serve both readings, so a checkpoint can be loaded either way."""
    names = {outside: [n for n, _ in memory_branch("window_gated_deltanet", outside).named_parameters()]
             for outside in (False, True)}
    assert names[False] == names[True]
