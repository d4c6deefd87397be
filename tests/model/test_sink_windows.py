"""Sliding windows with sinks: every query also sees its row's first `sinks` real tokens, in the mask, in one forward
and through generate()'s cache (SinkWindowLayer), with and without left padding."""

import pytest
import torch

from hybridize.model import HybridConfig, HybridForCausalLM, HybridModel
from hybridize.model.attention import attention_mask_for
from hybridize.model.cache import HybridCache, SinkWindowLayer

LAYERS = ["sliding_attention", "gated_deltanet", "sliding_attention", "full_attention", "window_mamba2"]


def _model(sinks: int, window: int = 6, layer_types=LAYERS):
    torch.manual_seed(0)
    config = HybridConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=len(layer_types),
                          num_attention_heads=4, num_key_value_heads=2, layer_types=layer_types,
                          sliding_window=window, sliding_window_sinks=sinks, max_position_embeddings=256)
    return HybridForCausalLM(config).eval()


def test_padded_mask_counts_sinks_among_real_tokens_only():
    """Row 0 has 3 pads: its sinks are slots 3 and 4, not 0 and 1; row 1 has none."""
    window, sinks, length = 3, 2, 12
    padding = torch.tensor([[0, 0, 0] + [1] * 9, [1] * 12])
    slots = torch.arange(length)
    rank = padding.cumsum(-1) - 1
    mask = attention_mask_for(slots, slots, window, padding, sinks, rank)[:, 0]  # [B, T, T]
    for row in range(2):
        first = 3 if row == 0 else 0
        for i in range(length):
            for j in range(length):
                real = bool(padding[row, j])
                expected = i == j or (real and j <= i and (i - j < window or first <= j < first + sinks))
                assert bool(mask[row, i, j]) == expected, (row, i, j)


def test_a_query_sees_its_sinks_and_window_and_nothing_between():
    """Changing a token between the sinks and a query's window leaves that query's output unchanged; changing a
    sink token does not. With sinks = 0 the sink token is out of reach too."""
    window, sinks = 4, 2
    length, query = 16, 15  # the query's window is 12..15, its sinks 0..1
    outputs = {}
    for sinks_ in (0, sinks):
        model = HybridModel(_model(sinks_, window, ["sliding_attention"]).config)
        hidden = torch.randn(1, length, 64, generator=torch.Generator().manual_seed(1))

        def at_query(changed_slot):
            x = hidden.clone()
            if changed_slot is not None:
                x[0, changed_slot] += 1.0
            return model(inputs_embeds=x, use_cache=False).last_hidden_state[0, query]

        base = at_query(None)
        outputs[sinks_] = {slot: (at_query(slot) - base).abs().max().item() for slot in (0, 1, 5, 11, 12)}
    assert outputs[sinks][5] == outputs[sinks][11] == 0.0
    assert outputs[sinks][0] > 1e-4 and outputs[sinks][1] > 1e-4 and outputs[sinks][12] > 1e-4
    assert outputs[0][0] == outputs[0][1] == 0.0


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("sinks", [1, 3])
def test_cached_decoding_equals_one_forward(padded, sinks):
    """Prefill 9 tokens, then one token at a time to 30: every step's logits equal one uncached forward over the
    whole sequence. The window is 6, so the cache drops keys from step 1 on while keeping the sinks."""
    model = _model(sinks)
    ids = torch.randint(1, 96, (3, 30), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0
        mask[2, :8] = 0  # one real prompt token: the sinks arrive while decoding
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, T, V]
        cache = HybridCache(model.config)
        steps = [model(input_ids=ids[:, :9], attention_mask=mask[:, :9], past_key_values=cache).logits]
        for t in range(9, 30):
            steps.append(model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                               past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), expected, atol=1e-5, rtol=1e-4)
    layer = cache.layers[0]
    assert isinstance(layer, SinkWindowLayer)
    pads = 8 if padded else 0
    assert layer.keys.shape[2] <= sinks + pads + model.config.sliding_window - 1  # the cache stays bounded


def test_sinks_change_what_generate_returns():
    """The same weights with and without sinks decode differently past the window: the sinks are used."""
    ids = torch.randint(1, 96, (2, 20), generator=torch.Generator().manual_seed(3))
    out = {}
    for sinks in (0, 2):
        model = _model(sinks)
        out[sinks] = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
    assert not torch.equal(out[0], out[2])


def test_negative_sinks_are_refused():
    with pytest.raises(ValueError, match="sliding_window_sinks"):
        _model(-1)
