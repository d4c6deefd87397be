"""Split-KV decode attention: Triton (interpreted on CPU) vs the fp64 reference and SDPA on the same values, within a
bound derived from the kernel's rounding (`_tolerance`); edge rows, the custom op."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rmse, rel_rmse, requires_cuda
from rounding import DIV, EXP2, U, rounding_tolerances

import hybridize.kernels.decode_attention.split_kv as split_kv
from hybridize.kernels.decode_attention import decode_attention
from hybridize.kernels.tuning import pinned


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


def _tolerance(q, keys, values, valid, expected, *, scale=None, rows=None) -> float:
    """`rounding_tolerances` of the split-KV kernel against `expected`, the fp64 reference on the same values (only
    the batch rows `rows`, if given).

    For a query row, o = sum_j p_j v_j / l with l = sum_j p_j, p_j = exp(s_j - m), s_j = c q . k_j, over the valid
    slots j. The kernel computes in fp32 (scores in log2 units), rounds p to the value dtype before p v (bf16: one
    cast of the numerator's terms) and rounds o once (u of its dtype). A shift common to a row cancels between
    numerator and denominator; what each p_j brings is its exponent's own absolute error, in u: the dot of D rounded
    products, (sqrt(D) + 1) c S_qk with S_qk^2 = sum_i q_i^2 k_ji^2; the scale (log2 e folded in), rounded and
    applied, 2 |s_j|; the shift, |s_j - m| <= 2 max|s|; exp2; and the rescales of the running sums by exp2 of the
    running max's increments, which add up to at most 2 max|s|, plus exp2's own error once per key tile, per split
    and for the merge, independent errors that add up like a chain's. Two products more: p v and the merge's
    weight. Sums: over the S keys and the rescales. The numerator's terms are p_j v_j / l; the denominator's are
    positive, so it is one term, o. Then the division."""
    D, S = q.shape[-1], keys.shape[2]
    scale = D**-0.5 if scale is None else scale
    slots = valid[:, None, :, None]  # [B, 1, S, 1]
    q, k, v = q.double(), keys.double().masked_fill(~slots, 0.0), values.double().masked_fill(~slots, 0.0)
    mask = valid[:, None, None, :]  # [B, 1, 1, S]
    logits = (scale * q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))  # [B, Hkv, G, S]
    weights = torch.softmax(logits, -1).nan_to_num()  # a row with no valid slot: 0
    s2 = weights.square() @ v.square() + expected.double().square()  # [B, Hkv, G, D]
    dot_error = (q.square() @ k.square().transpose(-1, -2)).sqrt()[mask.expand_as(logits)].max().item() * scale
    max_logit = logits.abs()[mask.expand_as(logits)].max().item()
    min_tile = min(c.kwargs["BS"] for c in split_kv.SPLIT_CONFIGS)
    rescales = -(-S // min_tile) + -(-S // split_kv.SPLIT_KEYS) + 1
    term_error = (D**0.5 + 1) * dot_error + 6 * max_logit + EXP2 * (1 + rescales**0.5) + 2
    if rows is not None:
        expected, s2 = expected[rows], s2[rows]
    return rounding_tolerances({"out": expected}, {"out": s2}, u_in=U[values.dtype], casts=1,
                               chain=S + rescales, term_error=term_error, result_casts=1, result_error=DIV)["out"]


def _check(q, keys, values, valid, *, scale=None):
    """Triton against the fp64 reference on the same values, and against SDPA on the rows with a valid slot."""
    out = decode_attention(q, keys, values, valid, scale=scale, backend="triton")
    assert out.dtype == q.dtype
    fp64 = [t.double() for t in (q, keys, values)]
    ref = decode_attention(*fp64, valid, scale=scale, backend="reference")
    assert_rel_rmse(out, ref, _tolerance(q, keys, values, valid, ref, scale=scale), "out vs reference")
    rows = valid.any(-1)
    assert (out[~rows] == 0).all(), "a row with no valid slot must be 0"
    sdpa = F.scaled_dot_product_attention(*(t[rows] for t in fp64), attn_mask=valid[rows][:, None, None, :],
                                          scale=scale)
    assert_rel_rmse(out[rows], sdpa, _tolerance(q, keys, values, valid, ref, scale=scale, rows=rows), "out vs SDPA")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("S", [1, 7, 75, 513])
@pytest.mark.parametrize("B, Hkv", [(3, 1), (4, 2)])
def test_matches_reference_and_sdpa(B, Hkv, S, D, G, dtype):
    _check(*_make(B, Hkv, G, S, D, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tolerance_rejects_slot_defects(dtype):
    """The bound passes the kernel and rejects what a wrong mask would give, rounded to the dtype as the kernel
    rounds: each row's last valid slot dropped, or its first invalid slot attended. Rows 3 on, whose masks are
    random, so that the edge rows' large errors do not decide it."""
    q, keys, values, valid = _make(6, 2, 3, 75, 16, dtype=dtype)
    out = _check(q, keys, values, valid)
    fp64 = [t.double() for t in (q, keys, values)]
    expected = decode_attention(*fp64, valid, backend="reference")
    rows = torch.arange(6) >= 3
    tol = _tolerance(q, keys, values, valid, expected, rows=rows)
    assert_rel_rmse(out[rows], expected[rows], tol, "out, random rows")
    slot = torch.arange(75)
    last_valid = torch.where(valid, slot, -1).amax(-1, keepdim=True)
    first_invalid = torch.where(valid, 75, slot).amin(-1, keepdim=True)
    for defect, wrong_valid in [("dropped slot", valid & (slot != last_valid)),
                                ("unmasked slot", valid | (slot == first_invalid))]:
        wrong = decode_attention(*fp64, wrong_valid, backend="reference").to(dtype)
        assert rel_rmse(wrong[rows], expected[rows]) > tol, f"{defect} passes"


def test_many_splits_with_empty_ones(monkeypatch):
    """16-key splits, shorter than the key tile: every split masks its own end, several see no valid key."""
    monkeypatch.setattr(split_kv, "SPLIT_KEYS", 16)
    q, keys, values, valid = _make(3, 2, 3, 75, 16)
    assert split_kv.split_plan(75, 6, sms=split_kv.NOMINAL_SMS) == (5, 16)
    valid[2, :48] = False  # splits 0-2 of row 2 are empty, split 3 and 4 are not
    valid[2, 60] = True
    _check(q, keys, values, valid)


def test_merge_over_more_splits_than_it_reads_at_once(monkeypatch):
    """19 splits of 16 keys: the last split of a row to finish merges them in three reads of MERGE_SPLITS, and
    leaves the row's count at zero, so a second call (a CUDA graph replay) merges again, to the same values."""
    monkeypatch.setattr(split_kv, "SPLIT_KEYS", 16)
    q, keys, values, valid = _make(3, 2, 3, 300, 16, seed=2)
    splits = split_kv.split_plan(300, 6, sms=split_kv.NOMINAL_SMS)[0]
    assert splits > 2 * split_kv.MERGE_SPLITS
    valid[1, 40:200] = False  # empty splits between full ones
    first = _check(q, keys, values, valid)
    assert not split_kv._arrival_counts(6, q.device).any(), "every count back at zero"
    assert torch.equal(decode_attention(q, keys, values, valid, backend="triton"), first)


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
    clean = [t.double().masked_fill(~valid[:, None, :, None], 0.0) for t in (keys, values)]
    expected = decode_attention(q.double(), *clean, valid, backend="reference")
    assert_rel_rmse(out, expected, _tolerance(q, keys, values, valid, expected), "out")


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

    # doubling is exact, so the bound of the op on q * 2 holds for the step
    def step(q, keys, values, valid):
        return decode_attention(q * 2.0, keys, values, valid, backend="triton") * 2.0

    with torch.inference_mode():  # as in StaticDecoder
        got = torch.compile(step, fullgraph=True, dynamic=False)(q, keys, values, valid)
        eager = step(q, keys, values, valid)
    assert torch.equal(got, eager), "the same kernel on the same values"
    ref = decode_attention(q.double() * 2.0, keys.double(), values.double(), valid, backend="reference")
    assert_rel_rmse(got, ref * 2.0, _tolerance(q * 2.0, keys, values, valid, ref), "compiled")
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
    expected = decode_attention(*(t.double() for t in second[:3]), second[3], backend="reference")
    assert_rel_rmse(out, expected, _tolerance(*second, expected), "replay")
