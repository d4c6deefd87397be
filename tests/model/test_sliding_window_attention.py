"""Sliding-window flex attention (compiled, run for real on the CPU) against SDPA with attention_mask_for's mask."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rmse, requires_cuda

from hybridize.model import HybridConfig, HybridModel, attention
from hybridize.model.attention import _window_block_mask, attention_mask_for, sliding_window_attention


TILE = 128  # flex attention's default block size

# (batch, query heads, KV heads, length, window, sinks): lengths off the 128-row tile; GQA ratio 3 and none; one
# token; a window of 1 (a token sees itself only), larger than the sequence, and just below the length; sinks
# of 1 and 4, and more sinks than a tile holds.
SHAPES = [
    (2, 6, 2, 1, 4, 0),
    (2, 6, 2, 75, 16, 0),
    (2, 6, 2, 300, 64, 0),
    (2, 6, 2, 300, 1, 0),
    (2, 6, 2, 75, 200, 0),
    (1, 4, 4, 129, 128, 0),
    (2, 6, 2, 300, 64, 4),
    (2, 6, 2, 75, 16, 1),
    (1, 4, 4, 300, 1, 130),
]


def dense_mask(length: int, window: int, sinks: int = 0) -> torch.Tensor:
    slots = torch.arange(length)
    return attention_mask_for(slots, slots, window, None, sinks)[0, 0]  # [T, T]


def qkv(batch, heads, kv_heads, length, dim=16, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim)]
    return [torch.randn(*shape, generator=gen).to(device, dtype) for shape in shapes]


@pytest.mark.parametrize("length, window", [(1, 4), (75, 16), (300, 64), (300, 1), (75, 200)])
def test_attention_mask_for_shows_each_query_itself_and_the_window_minus_one_keys_before_it(length, window):
    # Written out by hand, so that the flex path, which shares attention_mask_for's rule, is pinned as well.
    expected = torch.tensor([[i - window < j <= i for j in range(length)] for i in range(length)])
    assert torch.equal(dense_mask(length, window), expected)


@pytest.mark.parametrize("length, window, sinks", [(75, 16, 1), (300, 64, 4), (20, 1, 3), (10, 16, 4)])
def test_sinks_add_exactly_the_first_keys_to_each_window(length, window, sinks):
    expected = torch.tensor([[i - window < j <= i or j < sinks and j <= i for j in range(length)]
                             for i in range(length)])
    assert torch.equal(dense_mask(length, window, sinks), expected)


@pytest.mark.parametrize("length, window, sinks", [(75, 16, 0), (300, 64, 0), (300, 1, 0), (75, 200, 0),
                                                  (129, 128, 0), (700, 128, 0), (700, 128, 4), (300, 1, 130)])
def test_block_mask_lists_exactly_the_tiles_the_window_touches(length, window, sinks):
    """Compiled flex attention reads only the listed tiles and skips mask_mod in the "full" ones."""
    block_mask = _window_block_mask(length, window, sinks, torch.device("cpu"))
    tiles = -(-length // TILE)
    padded = torch.zeros(tiles * TILE, tiles * TILE, dtype=torch.bool)
    padded[:length, :length] = dense_mask(length, window, sinks)
    per_tile = padded.view(tiles, TILE, tiles, TILE).transpose(1, 2)  # [tiles, tiles, TILE, TILE]
    assert torch.equal(block_mask.to_dense()[0, 0].bool(), per_tile.any((-2, -1)))
    full = block_mask.full_kv_num_blocks[0, 0]  # [tiles]
    for row in range(tiles):
        for tile in block_mask.full_kv_indices[0, 0, row, : full[row]].tolist():
            assert per_tile[row, tile].all(), f"tile ({row}, {tile}) marked full but partly masked"


@pytest.mark.parametrize("batch, heads, kv_heads, length, window, sinks", SHAPES)
def test_flex_equals_sdpa_with_the_dense_mask(batch, heads, kv_heads, length, window, sinks):
    q, k, v = qkv(batch, heads, kv_heads, length)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(length, window, sinks), enable_gqa=True)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window, sinks), expected)


def test_a_window_one_token_off_is_caught():
    q, k, v = qkv(2, 6, 2, 300, seed=1)
    flex = sliding_window_attention(q, k, v, 64)
    for window in (63, 65):
        other = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(300, window), enable_gqa=True)
        assert (flex - other).abs().max() > 1e-3


# CPU flex attention has no backward (PyTorch raises), so gradients are checked where training runs: on CUDA.
@requires_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch, heads, kv_heads, length, window, sinks", SHAPES)
def test_cuda_flex_output_and_gradients_equal_sdpa(batch, heads, kv_heads, length, window, sinks, dtype, tol):
    inputs = qkv(batch, heads, kv_heads, length, dim=64, device="cuda", dtype=dtype)
    grad_out = torch.randn(batch, heads, length, 64, device="cuda", dtype=dtype)
    mask = dense_mask(length, window, sinks).cuda()
    results = {}
    for name, attend in (("flex", lambda q, k, v: sliding_window_attention(q, k, v, window, sinks)),
                         ("sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                 enable_gqa=True))):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out = attend(q, k, v)
        out.backward(grad_out)
        results[name] = (out, q.grad, k.grad, v.grad)
    for label, actual, expected in zip(("out", "dq", "dk", "dv"), results["flex"], results["sdpa"]):
        if label in ("dq", "dk") and min(length, window) == 1 and not sinks:
            # Each query sees one key: its softmax is constant, so dq and dk are 0 and either side holds only noise.
            assert actual.abs().max() < 1e-3, f"{label} of single-key rows"
        else:
            assert_rel_rmse(actual.float(), expected.float(), tol, label)


@requires_cuda
@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("autocast, tol", [(False, 1e-4), (True, 3e-2)])
def test_cuda_sliding_layer_takes_flex_and_matches_the_cpu_mask_path(autocast, tol, sinks, monkeypatch):
    """On CUDA the layer calls sliding_window_attention (under autocast q and k come fp32 from RoPE, v bf16); on
    the CPU it runs SDPA with the dense mask. Outputs and weight gradients agree."""
    calls = []
    monkeypatch.setattr(attention, "sliding_window_attention",
                        lambda *args: calls.append(args[0].device.type) or sliding_window_attention(*args))
    config = HybridConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                          num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                          layer_types=["sliding_attention"], sliding_window=64, sliding_window_sinks=sinks)
    torch.manual_seed(0)
    cpu = HybridModel(config)
    gpu = HybridModel(config).cuda()
    gpu.load_state_dict(cpu.state_dict())
    hidden, probe = torch.randn(2, 300, 128), torch.randn(2, 300, 128)
    outputs = {}
    for name, model, device in (("cpu", cpu, "cpu"), ("gpu", gpu, "cuda")):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast and device == "cuda"):
            out = model(inputs_embeds=hidden.to(device), use_cache=False).last_hidden_state  # [B, T, C]
        (out.float() * probe.to(device)).sum().backward()  # a random probe: every output matters to the gradient
        layer = model.layers[0].mixer
        outputs[name] = (out.float().cpu(), layer.q_proj.weight.grad.cpu(), layer.v_proj.weight.grad.cpu())
    assert calls == ["cuda"]
    for label, actual, expected in zip(("out", "dWq", "dWv"), outputs["gpu"], outputs["cpu"]):
        assert_rel_rmse(actual, expected, tol, label)


@requires_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_cuda_flex_without_gradients_takes_a_new_length_every_call(dtype, tol):
    """An evaluation's uncached forwards: no gradients, a new length each call, in one process. torch.compile's
    default would compile the second length with a dynamic one, which Inductor cannot lower for flex attention
    (NoValidChoicesError); each length compiles on its own instead."""
    for length in (33, 81, 120, 300):
        q, k, v = qkv(2, 6, 2, length, dim=64, device="cuda", dtype=dtype)
        mask = dense_mask(length, 16, 2).cuda()
        with torch.no_grad():
            flex = sliding_window_attention(q, k, v, 16, 2)
            sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        assert_rel_rmse(flex.float(), sdpa.float(), tol, f"length {length}")
