"""Where the chunks of a batch lie: B rows of T tokens, or N sequences packed along T by cu_seqlens (varlen).

Every sequence is cut into chunks of BT tokens. Without varlen the kernels compute positions from T and get no index
tensors. With varlen, chunk c over all sequences is (sequence, chunk within it) = chunk_indices[c], and sequence n's
first chunk is chunk_offsets[n]: the per-chunk buffers (states, gradient partials) hold a sequence's chunks in order
from there. The host side (`chunk_layout`) builds these; the jitted side (`sequence_span`, `chunk_span`,
`flat_chunk_span`, `first_chunk`) reads them inside the kernels.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


class ChunkLayout(NamedTuple):
    BT: int  # tokens per chunk
    T: int  # tokens along the T axis of the inputs
    N: int  # sequences: B, or len(cu_seqlens) - 1
    NT: int  # the grid's chunk axis: chunks per row without varlen, all chunks with it
    NC: int  # chunks over all sequences: the leading dim of the per-chunk buffers
    cu_seqlens: torch.Tensor | None  # [N + 1] int32
    chunk_indices: torch.Tensor | None  # [NC, 2] int32 (sequence, chunk within it), by sequence then chunk
    chunk_offsets: torch.Tensor | None  # [N + 1] int32, each sequence's first chunk (and NC at the end)

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens is not None


def chunk_layout(
    B: int, T: int, BT: int, cu_seqlens: torch.Tensor | None, device: torch.device, min_chunks: int = 0
) -> ChunkLayout:
    """The chunks of B rows of T tokens, or of the packed sequences of cu_seqlens (then B == 1).

    min_chunks: chunks given to every sequence however short, e.g. 1 so that an empty sequence still gets a program
    (which writes its state's gradient)."""
    if cu_seqlens is None:
        NT = max(min_chunks, triton.cdiv(T, BT))
        return ChunkLayout(BT, T, B, NT, B * NT, None, None, None)
    cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32).contiguous()
    counts = ((cu_seqlens[1:] - cu_seqlens[:-1] + BT - 1) // BT).clamp_min(min_chunks)  # [N]
    chunk_offsets = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)  # [N + 1]
    NC = int(chunk_offsets[-1])  # the grid size needs it on the host
    seq = torch.repeat_interleave(torch.arange(len(counts), device=device), counts, output_size=NC)  # [NC]
    local = torch.arange(NC, device=device) - chunk_offsets[seq]
    chunk_indices = torch.stack([seq, local], dim=1).to(torch.int32).contiguous()
    return ChunkLayout(BT, T, len(counts), NC, NC, cu_seqlens, chunk_indices, chunk_offsets)


@triton.jit
def sequence_span(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """First token (int64) and length (int32: block pointers want it) of sequence i_n; T: a row's length."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1) - bos).to(tl.int32)
    else:
        bos = i_n.to(tl.int64) * T
    return bos, T


@triton.jit
def chunk_span(cu_seqlens, chunk_indices, i_b, i_t, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """For a program on chunk i_t of batch row i_b (varlen: chunk i_t of all, i_b unused): its sequence, its chunk
    within that sequence, the sequence's first token and length, and its index in the per-chunk buffers (int64)."""
    if IS_VARLEN:
        i_c = i_t.to(tl.int64)
        i_n = tl.load(chunk_indices + i_t * 2)
        i_t = tl.load(chunk_indices + i_t * 2 + 1)
    else:
        i_c = i_b.to(tl.int64) * tl.cdiv(T, BT) + i_t
        i_n = i_b
    bos, T = sequence_span(cu_seqlens, i_n, T, IS_VARLEN)
    return i_n, i_t, bos, T, i_c


@triton.jit
def flat_chunk_span(cu_seqlens, chunk_indices, i_c, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """`chunk_span` for a grid with one axis over the chunks of all sequences: (sequence, chunk within it, first
    token, length)."""
    if IS_VARLEN:
        i_n, i_t, bos, T, _ = chunk_span(cu_seqlens, chunk_indices, 0, i_c, T, BT, IS_VARLEN)
    else:
        NT = tl.cdiv(T, BT)
        i_n, i_t, bos, T, _ = chunk_span(cu_seqlens, chunk_indices, i_c // NT, i_c % NT, T, BT, IS_VARLEN)
    return i_n, i_t, bos, T


@triton.jit
def first_chunk(chunk_offsets, i_n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Index of sequence i_n's first chunk in the per-chunk buffers (int64); T: a row's length."""
    if IS_VARLEN:
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        boh = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return boh
