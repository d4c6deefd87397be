"""The chunk layout of packed sequences (kernels/varlen.py): host-side indices and the jitted spans, against loops."""

import pytest
import torch
import triton
import triton.language as tl

from hybridize.kernels.varlen import chunk_layout, chunk_span, first_chunk, flat_chunk_span, sequence_span

# packed sequences with empty ones (at the start, in the middle, at the end), one-token ones, exact multiples of the
# chunk and one past them
CU_SEQLENS = [
    [0, 5],
    [0, 0, 1, 1, 17, 33, 34],
    [0, 16, 32, 32],
    [0, 1, 2, 3],
    [0, 0],
    [0, 40, 41, 100],
]


def _loop_layout(cu, BT, min_chunks):
    """chunk_indices and chunk_offsets written out by hand: sequence by sequence, chunk by chunk."""
    indices, offsets = [], [0]
    for n in range(len(cu) - 1):
        count = max(min_chunks, -(-(cu[n + 1] - cu[n]) // BT))
        indices += [[n, t] for t in range(count)]
        offsets.append(offsets[-1] + count)
    return indices, offsets


@pytest.mark.parametrize("min_chunks", [0, 1])
@pytest.mark.parametrize("BT", [1, 16, 64])
@pytest.mark.parametrize("cu", CU_SEQLENS)
def test_chunk_layout_matches_loop(cu, BT, min_chunks):
    lay = chunk_layout(1, cu[-1], BT, torch.tensor(cu, dtype=torch.int64), torch.device("cpu"), min_chunks)
    indices, offsets = _loop_layout(cu, BT, min_chunks)
    assert lay.varlen and lay.N == len(cu) - 1 and lay.NT == lay.NC == len(indices)
    assert lay.chunk_indices.dtype == lay.chunk_offsets.dtype == lay.cu_seqlens.dtype == torch.int32
    assert lay.chunk_indices.view(-1, 2).tolist() == indices
    assert lay.chunk_offsets.tolist() == offsets
    assert lay.cu_seqlens.tolist() == cu


@pytest.mark.parametrize("B, T, BT, min_chunks, NT", [(3, 75, 64, 0, 2), (2, 64, 64, 0, 1), (2, 0, 16, 0, 0),
                                                      (2, 0, 16, 1, 1), (1, 1, 32, 0, 1)])
def test_chunk_layout_without_varlen(B, T, BT, min_chunks, NT):
    lay = chunk_layout(B, T, BT, None, torch.device("cpu"), min_chunks)
    assert not lay.varlen and lay.chunk_indices is None and lay.chunk_offsets is None
    assert (lay.N, lay.NT, lay.NC) == (B, NT, B * NT)


@triton.jit
def _spans_kernel(cu_seqlens, chunk_indices, chunk_offsets, out, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    # one program per (chunk, batch row): what each span gives it, as 9 ints
    i_t, i_b = tl.program_id(0), tl.program_id(1)
    p = out + (i_b * tl.num_programs(0) + i_t) * 9
    i_n, i_tc, bos, T_n, i_c = chunk_span(cu_seqlens, chunk_indices, i_b, i_t, T, BT, IS_VARLEN)
    i_flat = i_b * tl.num_programs(0) + i_t
    f_n, f_t, f_bos, f_T = flat_chunk_span(cu_seqlens, chunk_indices, i_flat, T, BT, IS_VARLEN)
    s_bos, s_T = sequence_span(cu_seqlens, i_n, T, IS_VARLEN)
    tl.store(p + 0, i_n)
    tl.store(p + 1, i_tc)
    tl.store(p + 2, bos)
    tl.store(p + 3, T_n)
    tl.store(p + 4, i_c)
    tl.store(p + 5, first_chunk(chunk_offsets, i_n, T, BT, IS_VARLEN) + i_tc)
    # the flat grid and the per-sequence span agree with the per-row span
    tl.store(p + 6, (f_n == i_n) & (f_t == i_tc) & (f_bos == bos) & (f_T == T_n))
    tl.store(p + 7, (s_bos == bos) & (s_T == T_n))
    tl.store(p + 8, 1)


def _spans(lay, B):
    out = torch.zeros(B, lay.NT, 9, dtype=torch.int64)
    # without varlen the index tensors are absent: any pointer does, the kernel never reads one
    absent = torch.zeros(1, dtype=torch.int32)
    indices = [absent if x is None else x for x in (lay.cu_seqlens, lay.chunk_indices, lay.chunk_offsets)]
    _spans_kernel[(lay.NT, B)](*indices, out, lay.T, BT=lay.BT, IS_VARLEN=lay.varlen)
    return out.view(-1, 9).tolist()


@pytest.mark.parametrize("cu", [[0, 0, 1, 1, 17, 33, 34], [0, 40, 41, 100]])
def test_spans_varlen(cu):
    """Program c on the chunk axis is chunk c of all: its sequence, chunk in it, start, length, buffer index."""
    lay = chunk_layout(1, cu[-1], 16, torch.tensor(cu), torch.device("cpu"))
    indices, _ = _loop_layout(cu, 16, 0)
    expected = [[n, t, cu[n], cu[n + 1] - cu[n], c, c, 1, 1, 1] for c, (n, t) in enumerate(indices)]
    assert _spans(lay, 1) == expected


@pytest.mark.parametrize("B, T", [(3, 75), (2, 16), (1, 1)])
def test_spans_without_varlen(B, T):
    """Program (t, b) is chunk t of row b: it starts at b T, and its buffer index counts the rows' chunks before it."""
    lay = chunk_layout(B, T, 16, None, torch.device("cpu"))
    NT = -(-T // 16)
    expected = [[b, t, b * T, T, b * NT + t, b * NT + t, 1, 1, 1] for b in range(B) for t in range(NT)]
    assert _spans(lay, B) == expected
