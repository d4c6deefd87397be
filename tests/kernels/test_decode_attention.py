"""Split-KV decode attention: Triton (interpreted on CPU) vs the fp32 reference and SDPA, edge rows, the custom op."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rmse, requires_cuda

import hybridize.kernels.decode_attention.split_kv as split_kv
from hybridize.kernels.decode_attention import decode_attention
from hybridize.kernels.tuning import pinned

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # bf16: operands, P and the output are rounded to bf16


def _make(B, Hkv, G, S, D, *, dtype=torch.float32, device="cpu", seed=0):
    """q [B, Hkv, G, D], keys/values [B, Hkv, S, D] and valid [B, S] with awkward rows.

    With B > 1, row 0 has no valid slot, row 1 exactly one (in the middle), row 2 a random mask with the whole second
    split of the kernel's plan left invalid, so that split sees no key; other rows are random.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, keys, values = randn(B, Hkv, G, D), randn(B, Hkv, S, D), randn(B, Hkv, S, D)
    valid = torch.rand(B, S, generator=gen) < 0.7
    if B > 1:  # with one row only, keep it random: a batch with no valid key at all leaves nothing to compare
        valid[0] = False
        valid[1] = False
        valid[1, S // 2] = True
    if B > 2:
        valid[2, 0] = True
        splits, split_len = split_kv.split_plan(S, B * Hkv, sms=split_kv._sm_count(torch.device(device)))
        if splits > 1:
            valid[2, split_len : 2 * split_len] = False
    return q, keys, values, valid.to(device)


def _check(q, keys, values, valid, *, scale=None):
    """Triton against the reference (fp32 inputs) and against SDPA on the rows with a valid slot."""
    tol = TOL[q.dtype]
    out = decode_attention(q, keys, values, valid, scale=scale, backend="triton")
    assert out.dtype == q.dtype
    fp32 = [t.float() for t in (q, keys, values)]
    ref = decode_attention(*fp32, valid, scale=scale, backend="reference")
    assert_rel_rmse(out, ref, tol, "out vs reference")
    rows = valid.any(-1)
    assert (out[~rows] == 0).all(), "a row with no valid slot must be 0"
    sdpa = F.scaled_dot_product_attention(*(t[rows] for t in fp32), attn_mask=valid[rows][:, None, None, :],
                                          scale=scale)
    assert_rel_rmse(out[rows], sdpa, tol, "out vs SDPA")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("S", [1, 7, 75, 513])
@pytest.mark.parametrize("B, Hkv", [(3, 1), (4, 2)])
def test_matches_reference_and_sdpa(B, Hkv, S, D, G, dtype):
    _check(*_make(B, Hkv, G, S, D, dtype=dtype))


def test_many_splits_with_empty_ones(monkeypatch):
    """16-key splits, shorter than the key tile: every split masks its own end, several see no valid key."""
    monkeypatch.setattr(split_kv, "SPLIT_KEYS", 16)
    q, keys, values, valid = _make(3, 2, 3, 75, 16)
    assert split_kv.split_plan(75, 6, sms=split_kv.NOMINAL_SMS) == (5, 16)
    valid[2, :48] = False  # splits 0-2 of row 2 are empty, split 3 and 4 are not
    valid[2, 60] = True
    _check(q, keys, values, valid)


@pytest.mark.parametrize("BS", sorted({c.kwargs["BS"] for c in split_kv.SPLIT_CONFIGS}))
def test_every_key_tile(BS):
    config = next(c for c in split_kv.SPLIT_CONFIGS if c.kwargs["BS"] == BS)
    with pinned(split_kv._split_kernel, config):
        _check(*_make(3, 2, 3, 300, 64))


def test_scale_and_larger_groups():
    _check(*_make(3, 2, 8, 75, 64, seed=1), scale=0.3)


def test_invalid_slots_are_ignored_even_if_not_finite():
    """The kernel never reads an invalid slot: NaN/inf there must not reach the output."""
    q, keys, values, valid = _make(3, 2, 3, 75, 64)
    keys.masked_fill_(~valid[:, None, :, None], float("nan"))
    values.masked_fill_(~valid[:, None, :, None], float("inf"))
    out = decode_attention(q, keys, values, valid, backend="triton")
    clean = [t.masked_fill(~valid[:, None, :, None], 0.0) for t in (keys, values)]
    assert_rel_rmse(out, decode_attention(q, *clean, valid, backend="reference"), TOL[q.dtype], "out")


def test_non_contiguous_slots():
    """Keys and values are read through their strides (here a [B, S, Hkv, D] buffer seen as [B, Hkv, S, D])."""
    q, keys, values, valid = _make(3, 2, 3, 75, 64)
    keys, values = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (keys, values))
    assert not keys.is_contiguous()
    _check(q, keys, values, valid)


def test_split_plan():
    """Splits cover S exactly once, are whole multiples of SPLIT_KEYS, and fill the SMs when S allows it."""
    sms = 132
    for S in (1, 7, 75, 513, 1024, 8192, 32768):
        for heads in (1, 3, 48, 128, 1024):
            splits, split_len = split_kv.split_plan(S, heads, sms=sms)
            assert 1 <= splits <= split_kv.MAX_SPLITS and split_len % split_kv.SPLIT_KEYS == 0
            assert (splits - 1) * split_len < S <= splits * split_len, (S, heads)
    assert split_kv.split_plan(8192, 16 * 3, sms=sms)[0] * 48 >= 3 * sms  # the profiled case: B16 Hkv3
    assert split_kv.split_plan(8192, 3, sms=sms)[0] * 3 >= sms  # B1


def test_rejects_bad_shapes():
    q, keys, values, valid = _make(2, 2, 3, 7, 16)
    with pytest.raises(ValueError, match="valid"):
        decode_attention(q, keys, values, valid[:, :5], backend="triton")
    with pytest.raises(ValueError, match="keys and values"):
        decode_attention(q, keys, values[:, :1], valid, backend="triton")
    with pytest.raises(ValueError, match="query heads"):
        decode_attention(q.repeat(1, 1, 6, 1), keys, values, valid, backend="triton")


def test_custom_op_under_torch_compile():
    """Compiled, the launch is the opaque hybridize::decode_attention node: same output as eager, no graph break."""
    q, keys, values, valid = _make(3, 2, 3, 75, 64)

    def step(q, keys, values, valid):
        return decode_attention(q * 2.0, keys, values, valid, backend="triton") + 1.0

    with torch.inference_mode():  # as in StaticDecoder
        got = torch.compile(step, fullgraph=True, dynamic=False)(q, keys, values, valid)
        eager = step(q, keys, values, valid)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    ref = decode_attention(q * 2.0, keys, values, valid, backend="reference") + 1.0
    assert_rel_rmse(got, ref, TOL[q.dtype], "compiled")
    assert "!" not in str(torch.ops.hybridize.decode_attention.default._schema)  # it writes no input


@requires_cuda
@pytest.mark.parametrize("B, Hkv, G, S, D", [(16, 3, 3, 8192, 64), (16, 8, 4, 8192, 64), (4, 8, 8, 4096, 128),
                                             (1, 3, 3, 8192, 64), (2, 3, 3, 75, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(B, Hkv, G, S, D, dtype):
    _check(*_make(B, Hkv, G, S, D, dtype=dtype, device="cuda"))


@requires_cuda
def test_cuda_graph_replays_the_op():
    """Captured in a CUDA graph (as in StaticDecoder), a replay on new inputs written in place gives their result."""
    first, second = (_make(16, 3, 3, 2048, 64, dtype=torch.bfloat16, device="cuda", seed=seed) for seed in (0, 1))
    inputs = [t.clone() for t in first]
    decode_attention(*inputs)  # autotune and compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(*inputs)
    for buffer, new in zip(inputs, second):
        buffer.copy_(new)
    graph.replay()
    torch.testing.assert_close(out, decode_attention(*second), rtol=0, atol=0)
    assert_rel_rmse(out, decode_attention(*(t.float() for t in second[:3]), second[3], backend="reference"),
                    TOL[torch.bfloat16], "replay")
