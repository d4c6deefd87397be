"""scripts/sink_window_probe.py's emulated mask: plain windows at S = 0; at S > 0 the first S real tokens join."""

import importlib.util
from pathlib import Path

import torch

from hybridize.model.attention import attention_mask_for

REPO = Path(__file__).resolve().parents[2]


def probe():
    spec = importlib.util.spec_from_file_location("probe", REPO / "scripts" / "sink_window_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sink_mask_adds_exactly_the_first_real_tokens():
    with_sinks = probe().with_sinks
    slots = torch.arange(10)
    assert torch.equal(with_sinks(0)(slots, slots, 3, None), attention_mask_for(slots, slots, 3, None))
    mask = with_sinks(2)(slots, slots, 3, None)[0, 0]  # [T, T]
    expected = torch.tensor([[i - 3 < j <= i or j < min(2, i + 1) for j in range(10)] for i in range(10)])
    assert torch.equal(mask, expected)
    # left padding: row 1's first two real tokens are slots 3 and 4; padding is never a sink
    valid = torch.ones(2, 10, dtype=torch.long)
    valid[1, :3] = 0
    padded = with_sinks(2)(slots, slots, 3, valid)
    assert padded[1, 0, 9, :].nonzero().flatten().tolist() == [3, 4, 7, 8, 9]
    assert padded[0, 0, 9, :].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    # full attention layers (window None) are left as they are
    assert torch.equal(with_sinks(2)(slots, slots, None, None), attention_mask_for(slots, slots, None, None))
