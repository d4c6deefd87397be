"""StaticDecoder gives generate()'s greedy tokens, with its static slots, ring buffers and in-place states."""

import pytest
import torch
from helpers import requires_cuda

from hybridize.evaluate.fast_decode import StaticDecoder
from hybridize.model import HybridConfig, HybridForCausalLM

LAYERS = ["mamba2", "full_attention", "gated_deltanet", "sliding_attention", "mamba2", "full_attention"]


def _model(layer_types=LAYERS, window=8, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    config = HybridConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=len(layer_types),
                          num_attention_heads=4, num_key_value_heads=2, layer_types=layer_types, sliding_window=window,
                          max_position_embeddings=256, conv_kernel_size=4)
    return HybridForCausalLM(config).to(device=device, dtype=dtype).eval()


def _reference(model, ids, new_tokens, attention_mask=None):
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)


@pytest.mark.parametrize("padded", [False, True])
def test_same_tokens_as_generate(padded):
    """17 prompt + 24 new tokens: the 8-token sliding window wraps its ring several times."""
    model = _model()
    ids = torch.randint(1, 128, (3, 17), generator=torch.Generator().manual_seed(1))
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        mask[2, :1] = 0
    decoder = StaticDecoder(model, batch_size=3, max_length=48)
    assert torch.equal(decoder.generate(ids, 24, attention_mask=mask), _reference(model, ids, 24, mask))


def test_decoder_is_reusable():
    """A second prompt on the same decoder ignores everything the first one left in the buffers."""
    model = _model()
    gen = torch.Generator().manual_seed(2)
    first, second = torch.randint(1, 128, (2, 20), generator=gen), torch.randint(1, 128, (2, 9), generator=gen)
    decoder = StaticDecoder(model, batch_size=2, max_length=40)
    decoder.generate(first, 12)
    assert torch.equal(decoder.generate(second, 12), _reference(model, second, 12))


def test_cache_bytes():
    """Full attention holds max_length K/V slots (rounded up to 8), sliding attention its window; states are fixed."""
    model = _model(["full_attention", "sliding_attention", "gated_deltanet"], window=5)
    config = model.config
    small, large = StaticDecoder(model, 2, 40), StaticDecoder(model, 2, 80)
    kv = 2 * 2 * config.num_key_value_heads * config.head_dim * 4  # K and V, batch 2, fp32, per slot
    assert large.cache_nbytes() - small.cache_nbytes() == (kv + 2) * 40  # + one validity byte per slot and row
    gdn = model.model.layers[2].mixer
    state = 2 * gdn.num_heads * gdn.head_k_dim * gdn.head_v_dim * 4 + 2 * sum(gdn.conv_channels) * 3 * 4
    valid = 2 * (40 + 8)  # one bool per slot and row
    assert small.cache_nbytes() == kv * (40 + 8) + state + valid


def test_rejects_prompts_that_do_not_fit():
    decoder = StaticDecoder(_model(), batch_size=2, max_length=16)
    with pytest.raises(ValueError, match="exceed"):
        decoder.generate(torch.ones(2, 10, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="does not fit"):
        decoder.generate(torch.ones(3, 4, dtype=torch.long), 2)


def test_compiled_step_gives_the_same_tokens():
    """torch.compile traces the whole step (what runs on a GPU before capture) and changes no token."""
    model = _model(["mamba2", "full_attention", "gated_deltanet", "sliding_attention"])
    ids = torch.randint(1, 128, (2, 11), generator=torch.Generator().manual_seed(4))
    decoder = StaticDecoder(model, batch_size=2, max_length=32, compile_step=True, log=pytest.fail)
    assert decoder.compiled
    assert torch.equal(decoder.generate(ids, 16), _reference(model, ids, 16))


@requires_cuda
@pytest.mark.parametrize("compile_step", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_matches_eager(dtype, compile_step):
    """The captured step replays what the eager step computes (and, in fp32, what generate() picks)."""
    model = _model(device="cuda", dtype=dtype)
    ids = torch.randint(1, 128, (4, 33), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    graphed = StaticDecoder(model, 4, 96, compile_step=compile_step, log=pytest.fail)
    assert graphed.use_cuda_graph and graphed.compiled == compile_step
    eager = StaticDecoder(model, 4, 96, use_cuda_graph=False, compile_step=False).generate(ids, 48)
    tokens = graphed.generate(ids, 48)
    if compile_step:  # fused kernels round differently: the same tokens up to near-ties
        assert (tokens == eager).float().mean() > 0.9
    else:
        assert torch.equal(tokens, eager)
    if dtype == torch.float32:
        assert (tokens == _reference(model, ids, 48)).float().mean() > 0.9
