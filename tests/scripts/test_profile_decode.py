"""scripts/profile_decode.py --layer-types: each model it times has the hybrid's shape and every layer of one type."""

from pathlib import Path

import pytest
import torch
from helpers import load_script

from hybridize.model import HybridConfig

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "profile_decode.py"


@pytest.mark.parametrize("kind", ["window_gated_deltanet", "sliding_attention", "headwise_mamba2"])
def test_every_layer_becomes_the_named_type_at_the_hybrids_shape(kind, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as when run: its folder first on the path (for bench/)
    config = HybridConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                          layer_types=["full_attention", "gated_deltanet", "mamba2"])
    model = load_script(SCRIPT).model_of_type(config, kind, device="cpu")
    assert model.config.layer_types == [kind] * 3
    assert model.dtype == torch.bfloat16
    assert (model.config.hidden_size, model.config.head_dim, model.config.sliding_window) == (32, 16, 8)
    if kind.startswith("headwise_"):  # the first KV head stays attention in every layer
        assert model.config.headwise_kv_heads == {"0": [0], "1": [0], "2": [0]}
        assert all(layer.mixer.window.num_kv_heads == 1 for layer in model.model.layers)
