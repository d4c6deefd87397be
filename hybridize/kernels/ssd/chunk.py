"""Triton chunked Mamba2 SSD: forward and backward kernels, an autograd.Function, and the public `chunk_ssd`.

Forward: local cumsum of g -> chunk states h -> output o. Backward: states h again -> state gradients dh
-> dv -> dq, dk, dg. The equations, including the chunk-local form of dg, are in README.md.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from hybridize.kernels.varlen import ChunkLayout, chunk_layout, chunk_span, first_chunk, sequence_span

# Block sizes along N (BK) and P (BV); tl.dot needs at least 16.
_MAX_BK = 64
_MAX_BV = 64


def _block(dim: int, cap: int) -> int:
    return min(max(triton.next_power_of_2(dim), 16), cap)


@triton.jit
def _load_chunk_g(gc, i_t, T, H: tl.constexpr, BT: tl.constexpr):
    """The chunk's cumulative log decays [BT] (0 past the end) and the value at its last token."""
    p_g = tl.make_block_ptr(gc, (T,), (H,), (i_t * BT,), (BT,), (0,))
    b_g = tl.load(p_g, boundary_check=(0,), padding_option="zero")
    b_g_last = tl.load(gc + (tl.minimum(i_t * BT + BT, T) - 1) * H)
    return b_g, b_g_last


@triton.jit
def chunk_ssd_cumsum_kernel(
    g, gc, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, i_t, bos, T, _ = chunk_span(cu_seqlens, chunk_indices, i_b, i_t, T, BT, IS_VARLEN)
    p_g = tl.make_block_ptr(g + bos * H, (T, H), (H, 1), (i_t * BT, i_h * BH), (BT, BH), (1, 0))
    p_gc = tl.make_block_ptr(gc + bos * H, (T, H), (H, 1), (i_t * BT, i_h * BH), (BT, BH), (1, 0))
    b_g = tl.load(p_g, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    tl.store(p_gc, tl.cumsum(b_g, axis=0), boundary_check=(0, 1))


@triton.jit
def chunk_ssd_fwd_kernel_h(
    k, v, gc, h, h0, ht, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    i_g = i_h // (H // G)
    boh = first_chunk(chunk_offsets, i_n, T, BT, IS_VARLEN)
    bos, T = sequence_span(cu_seqlens, i_n, T, IS_VARLEN)
    NT = tl.cdiv(T, BT)
    k += (bos * G + i_g) * N
    v += (bos * H + i_h) * P
    gc += bos * H + i_h

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        p_h0 = tl.make_block_ptr(h0 + i_nh * N * P, (N, P), (P, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        b_h = tl.load(p_h0, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    for i_t in range(NT):
        # h[i_t] is the state entering chunk i_t.
        o_h = ((boh + i_t) * H + i_h) * N * P
        p_h = tl.make_block_ptr(h + o_h, (N, P), (P, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        tl.store(p_h, b_h.to(p_h.dtype.element_ty), boundary_check=(0, 1))
        p_k = tl.make_block_ptr(k, (N, T), (1, G * N), (i_k * BK, i_t * BT), (BK, BT), (0, 1))
        p_v = tl.make_block_ptr(v, (T, P), (H * P, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        b_g, b_g_last = _load_chunk_g(gc, i_t, T, H, BT)
        b_k = tl.load(p_k, boundary_check=(0, 1), padding_option="zero")  # [BK, BT]
        b_v = tl.load(p_v, boundary_check=(0, 1), padding_option="zero")  # [BT, BV]
        b_v = (b_v * tl.exp(b_g_last - b_g)[:, None]).to(b_v.dtype)
        b_h = b_h * tl.exp(b_g_last) + tl.dot(b_k, b_v)
    if STORE_FINAL_STATE:
        p_ht = tl.make_block_ptr(ht + i_nh * N * P, (N, P), (P, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        tl.store(p_ht, b_h, boundary_check=(0, 1))


@triton.jit
def chunk_ssd_fwd_kernel_o(
    q, k, v, gc, h, o, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // (H // G)
    _, i_t, bos, T, i_tg = chunk_span(cu_seqlens, chunk_indices, i_b, i_t, T, BT, IS_VARLEN)
    q += (bos * G + i_g) * N
    k += (bos * G + i_g) * N
    v += (bos * H + i_h) * P
    o += (bos * H + i_h) * P
    gc += bos * H + i_h
    h += (i_tg * H + i_h) * N * P

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(N, BK)):
        p_q = tl.make_block_ptr(q, (T, N), (G * N, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
        p_k = tl.make_block_ptr(k, (N, T), (1, G * N), (i_k * BK, i_t * BT), (BK, BT), (0, 1))
        p_h = tl.make_block_ptr(h, (N, P), (P, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        b_q = tl.load(p_q, boundary_check=(0, 1), padding_option="zero")  # [BT, BK]
        b_k = tl.load(p_k, boundary_check=(0, 1), padding_option="zero")  # [BK, BT]
        b_h = tl.load(p_h, boundary_check=(0, 1), padding_option="zero")  # [BK, BV]
        b_o += tl.dot(b_q, b_h)
        b_A += tl.dot(b_q, b_k)
    b_g, b_g_last = _load_chunk_g(gc, i_t, T, H, BT)
    o_i = tl.arange(0, BT)
    # Causal, and only rows inside the sequence: past its end g is 0 and exp(g_i - g_j) could overflow.
    m_A = (o_i[:, None] >= o_i[None, :]) & (i_t * BT + o_i < T)[:, None]
    b_A = b_A * tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], float("-inf")))
    p_v = tl.make_block_ptr(v, (T, P), (H * P, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
    b_v = tl.load(p_v, boundary_check=(0, 1), padding_option="zero")  # [BT, BV]
    b_o = (b_o * tl.exp(b_g)[:, None] + tl.dot(b_A.to(b_v.dtype), b_v)) * scale
    p_o = tl.make_block_ptr(o, (T, P), (H * P, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def chunk_ssd_bwd_kernel_dh(
    q, gc, do, dh, dht, dh0, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr, STORE_INITIAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    i_g = i_h // (H // G)
    boh = first_chunk(chunk_offsets, i_n, T, BT, IS_VARLEN)
    bos, T = sequence_span(cu_seqlens, i_n, T, IS_VARLEN)
    NT = tl.cdiv(T, BT)
    q += (bos * G + i_g) * N
    do += (bos * H + i_h) * P
    gc += bos * H + i_h

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        p_dht = tl.make_block_ptr(dht + i_nh * N * P, (N, P), (P, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        b_dh = tl.load(p_dht, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    for i_t in range(NT - 1, -1, -1):
        # dh[i_t] is the gradient of the state leaving chunk i_t.
        o_dh = ((boh + i_t) * H + i_h) * N * P
        p_dh = tl.make_block_ptr(dh + o_dh, (N, P), (P, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        tl.store(p_dh, b_dh.to(p_dh.dtype.element_ty), boundary_check=(0, 1))
        p_q = tl.make_block_ptr(q, (N, T), (1, G * N), (i_k * BK, i_t * BT), (BK, BT), (0, 1))
        p_do = tl.make_block_ptr(do, (T, P), (H * P, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        b_g, b_g_last = _load_chunk_g(gc, i_t, T, H, BT)
        b_q = tl.load(p_q, boundary_check=(0, 1), padding_option="zero")  # [BK, BT]
        b_do = tl.load(p_do, boundary_check=(0, 1), padding_option="zero")  # [BT, BV]
        b_q = (b_q * (tl.exp(b_g) * scale)[None, :]).to(b_q.dtype)
        b_dh = b_dh * tl.exp(b_g_last) + tl.dot(b_q, b_do)
    if STORE_INITIAL_STATE_GRADIENT:
        p_dh0 = tl.make_block_ptr(dh0 + i_nh * N * P, (N, P), (P, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        tl.store(p_dh0, b_dh, boundary_check=(0, 1))


@triton.jit
def chunk_ssd_bwd_kernel_dv(
    q, k, gc, do, dh, dv, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // (H // G)
    _, i_t, bos, T, i_tg = chunk_span(cu_seqlens, chunk_indices, i_b, i_t, T, BT, IS_VARLEN)
    q += (bos * G + i_g) * N
    k += (bos * G + i_g) * N
    do += (bos * H + i_h) * P
    dv += (bos * H + i_h) * P
    gc += bos * H + i_h
    dh += (i_tg * H + i_h) * N * P

    # b_At[j, i] = k_j . q_i, built as its own product (not a transposed dot result; see README).
    b_At = tl.zeros([BT, BT], dtype=tl.float32)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(N, BK)):
        p_k = tl.make_block_ptr(k, (T, N), (G * N, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
        p_q = tl.make_block_ptr(q, (N, T), (1, G * N), (i_k * BK, i_t * BT), (BK, BT), (0, 1))
        p_dh = tl.make_block_ptr(dh, (N, P), (P, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        b_k = tl.load(p_k, boundary_check=(0, 1), padding_option="zero")  # [BT, BK]
        b_q = tl.load(p_q, boundary_check=(0, 1), padding_option="zero")  # [BK, BT]
        b_dh = tl.load(p_dh, boundary_check=(0, 1), padding_option="zero")  # [BK, BV]
        b_At += tl.dot(b_k, b_q)
        b_dv += tl.dot(b_k, b_dh)
    b_g, b_g_last = _load_chunk_g(gc, i_t, T, H, BT)
    o_i = tl.arange(0, BT)
    m_At = (o_i[:, None] <= o_i[None, :]) & (i_t * BT + o_i < T)[None, :]
    b_At = b_At * tl.exp(tl.where(m_At, b_g[None, :] - b_g[:, None], float("-inf"))) * scale
    p_do = tl.make_block_ptr(do, (T, P), (H * P, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
    b_do = tl.load(p_do, boundary_check=(0, 1), padding_option="zero")  # [BT, BV]
    b_dv = b_dv * tl.exp(b_g_last - b_g)[:, None] + tl.dot(b_At.to(b_do.dtype), b_do)
    p_dv = tl.make_block_ptr(dv, (T, P), (H * P, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
    tl.store(p_dv, b_dv.to(p_dv.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def chunk_ssd_bwd_kernel_dqkg(
    q, k, v, gc, h, do, dh, dq, dk, dg, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // (H // G)
    _, i_t, bos, T, i_tg = chunk_span(cu_seqlens, chunk_indices, i_b, i_t, T, BT, IS_VARLEN)
    q += (bos * G + i_g) * N
    k += (bos * G + i_g) * N
    v += (bos * H + i_h) * P
    do += (bos * H + i_h) * P
    dq += (bos * H + i_h) * N
    dk += (bos * H + i_h) * N
    gc += bos * H + i_h
    dg += bos * H + i_h
    h += (i_tg * H + i_h) * N * P
    dh += (i_tg * H + i_h) * N * P

    # b_dA[i, j] = do_i . v_j and b_dAt[j, i] = v_j . do_i, each its own product (see README).
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dAt = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(P, BV)):
        p_do = tl.make_block_ptr(do, (T, P), (H * P, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        p_doT = tl.make_block_ptr(do, (P, T), (1, H * P), (i_v * BV, i_t * BT), (BV, BT), (0, 1))
        p_v = tl.make_block_ptr(v, (T, P), (H * P, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        p_vT = tl.make_block_ptr(v, (P, T), (1, H * P), (i_v * BV, i_t * BT), (BV, BT), (0, 1))
        b_dA += tl.dot(tl.load(p_do, boundary_check=(0, 1), padding_option="zero"),
                       tl.load(p_vT, boundary_check=(0, 1), padding_option="zero"))
        b_dAt += tl.dot(tl.load(p_v, boundary_check=(0, 1), padding_option="zero"),
                        tl.load(p_doT, boundary_check=(0, 1), padding_option="zero"))
    b_g, b_g_last = _load_chunk_g(gc, i_t, T, H, BT)
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < T
    m_A = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]
    m_At = (o_i[:, None] <= o_i[None, :]) & m_t[None, :]
    b_dA = (b_dA * tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], float("-inf"))) * scale).to(q.dtype.element_ty)
    b_dAt = (b_dAt * tl.exp(tl.where(m_At, b_g[None, :] - b_g[:, None], float("-inf"))) * scale).to(q.dtype.element_ty)

    # d/db_i (chunk-local cumsum) = q_i.dq_i - k_i.dk_i, plus sum(h_next * dh_next) at the last token.
    b_dg = tl.zeros([BT], dtype=tl.float32)
    b_hdh = tl.zeros([1], dtype=tl.float32)  # sum(h * dh): entering state times leaving-state gradient
    b_kdk = tl.zeros([1], dtype=tl.float32)  # sum(k * dk) over the state part of dk
    for i_k in range(tl.cdiv(N, BK)):
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(tl.cdiv(P, BV)):
            p_do = tl.make_block_ptr(do, (T, P), (H * P, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
            p_v = tl.make_block_ptr(v, (T, P), (H * P, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
            p_hT = tl.make_block_ptr(h, (P, N), (1, P), (i_v * BV, i_k * BK), (BV, BK), (0, 1))
            p_dhT = tl.make_block_ptr(dh, (P, N), (1, P), (i_v * BV, i_k * BK), (BV, BK), (0, 1))
            b_hT = tl.load(p_hT, boundary_check=(0, 1), padding_option="zero")  # [BV, BK]
            b_dhT = tl.load(p_dhT, boundary_check=(0, 1), padding_option="zero")  # [BV, BK]
            b_dq += tl.dot(tl.load(p_do, boundary_check=(0, 1), padding_option="zero"), b_hT)
            b_dk += tl.dot(tl.load(p_v, boundary_check=(0, 1), padding_option="zero"), b_dhT)
            b_hdh += tl.sum(b_hT.to(tl.float32) * b_dhT.to(tl.float32))
        p_q = tl.make_block_ptr(q, (T, N), (G * N, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
        p_k = tl.make_block_ptr(k, (T, N), (G * N, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
        b_q = tl.load(p_q, boundary_check=(0, 1), padding_option="zero")  # [BT, BK]
        b_k = tl.load(p_k, boundary_check=(0, 1), padding_option="zero")  # [BT, BK]
        b_dq = b_dq * (tl.exp(b_g) * scale)[:, None] + tl.dot(b_dA, b_k)
        b_dk = b_dk * tl.exp(b_g_last - b_g)[:, None]
        b_kdk += tl.sum(b_k.to(tl.float32) * b_dk)
        b_dk += tl.dot(b_dAt, b_q)
        b_dg += tl.sum(b_q.to(tl.float32) * b_dq - b_k.to(tl.float32) * b_dk, axis=1)
        p_dq = tl.make_block_ptr(dq, (T, N), (H * N, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
        p_dk = tl.make_block_ptr(dk, (T, N), (H * N, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
        tl.store(p_dq, b_dq.to(p_dq.dtype.element_ty), boundary_check=(0, 1))
        tl.store(p_dk, b_dk.to(p_dk.dtype.element_ty), boundary_check=(0, 1))
    # g_s enters b_i for every i >= s in the chunk: a reverse cumsum; the last token's extra term reaches all.
    b_dg = tl.sum(b_dg, axis=0) - tl.cumsum(b_dg, axis=0) + b_dg + (b_hdh * tl.exp(b_g_last) + b_kdk)
    p_dg = tl.make_block_ptr(dg, (T,), (H,), (i_t * BT,), (BT,), (0,))
    tl.store(p_dg, b_dg, boundary_check=(0,))


def chunk_local_cumsum(g: torch.Tensor, chunks: ChunkLayout) -> torch.Tensor:
    """fp32 cumulative sum of g within each chunk: [B, T, H] -> [B, T, H]."""
    B, T, H = g.shape
    gc = torch.empty(B, T, H, dtype=torch.float32, device=g.device)
    BH = min(triton.next_power_of_2(H), 64)
    grid = (chunks.NT, triton.cdiv(H, BH), B)
    chunk_ssd_cumsum_kernel[grid](
        g, gc, chunks.cu_seqlens, chunks.chunk_indices, T,
        H=H, BT=chunks.BT, BH=BH, IS_VARLEN=chunks.varlen,
    )
    return gc


def chunk_fwd_h(
    k: torch.Tensor,
    v: torch.Tensor,
    gc: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    output_final_state: bool,
    chunks: ChunkLayout,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """States entering every chunk, h [total_chunks, H, N, P] in k's dtype, and the final state (fp32)."""
    B, T, G, N = k.shape
    H, P = v.shape[2], v.shape[3]
    BK, BV = _block(N, _MAX_BK), _block(P, _MAX_BV)
    h = torch.empty(chunks.NC, H, N, P, dtype=k.dtype, device=k.device)
    ht = torch.empty(chunks.N, H, N, P, dtype=torch.float32, device=k.device) if output_final_state else None
    grid = (triton.cdiv(N, BK), triton.cdiv(P, BV), chunks.N * H)
    chunk_ssd_fwd_kernel_h[grid](
        k, v, gc, h, initial_state, ht, chunks.cu_seqlens, chunks.chunk_offsets, T,
        H=H, G=G, N=N, P=P, BT=chunks.BT, BK=BK, BV=BV,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        IS_VARLEN=chunks.varlen,
    )
    return h, ht


def chunk_fwd_o(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gc: torch.Tensor, h: torch.Tensor, scale: float, chunks: ChunkLayout
) -> torch.Tensor:
    """o = scale * (exp(b) * (q h) + ((q k^T) * decay mask) v) per chunk: [B, T, H, P] in v's dtype."""
    B, T, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    BK, BV = _block(N, _MAX_BK), _block(P, _MAX_BV)
    o = torch.empty_like(v)
    grid = (triton.cdiv(P, BV), chunks.NT, B * H)
    chunk_ssd_fwd_kernel_o[grid](
        q, k, v, gc, h, o, chunks.cu_seqlens, chunks.chunk_indices, scale, T,
        H=H, G=G, N=N, P=P, BT=chunks.BT, BK=BK, BV=BV, IS_VARLEN=chunks.varlen,
    )
    return o


def chunk_bwd_dh(
    q: torch.Tensor,
    gc: torch.Tensor,
    do: torch.Tensor,
    dht: Optional[torch.Tensor],
    scale: float,
    want_dh0: bool,
    chunks: ChunkLayout,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of the states leaving every chunk, dh [total_chunks, H, N, P] in q's dtype, and dh0 (fp32)."""
    B, T, G, N = q.shape
    H, P = do.shape[2], do.shape[3]
    BK, BV = _block(N, _MAX_BK), _block(P, _MAX_BV)
    dh = torch.empty(chunks.NC, H, N, P, dtype=q.dtype, device=q.device)
    dh0 = torch.empty(chunks.N, H, N, P, dtype=torch.float32, device=q.device) if want_dh0 else None
    grid = (triton.cdiv(N, BK), triton.cdiv(P, BV), chunks.N * H)
    chunk_ssd_bwd_kernel_dh[grid](
        q, gc, do, dh, dht, dh0, chunks.cu_seqlens, chunks.chunk_offsets, scale, T,
        H=H, G=G, N=N, P=P, BT=chunks.BT, BK=BK, BV=BV,
        USE_FINAL_STATE_GRADIENT=dht is not None, STORE_INITIAL_STATE_GRADIENT=want_dh0,
        IS_VARLEN=chunks.varlen,
    )
    return dh, dh0


def chunk_bwd_dv(
    q: torch.Tensor,
    k: torch.Tensor,
    gc: torch.Tensor,
    do: torch.Tensor,
    dh: torch.Tensor,
    scale: float,
    chunks: ChunkLayout,
) -> torch.Tensor:
    """dv = ((k q^T) * decay mask) do + exp(b_last - b) * (k dh): [B, T, H, P] in do's dtype."""
    B, T, G, N = q.shape
    H, P = do.shape[2], do.shape[3]
    BK, BV = _block(N, _MAX_BK), _block(P, _MAX_BV)
    dv = torch.empty_like(do)
    grid = (triton.cdiv(P, BV), chunks.NT, B * H)
    chunk_ssd_bwd_kernel_dv[grid](
        q, k, gc, do, dh, dv, chunks.cu_seqlens, chunks.chunk_indices, scale, T,
        H=H, G=G, N=N, P=P, BT=chunks.BT, BK=BK, BV=BV, IS_VARLEN=chunks.varlen,
    )
    return dv


def chunk_bwd_dqkg(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gc: torch.Tensor,
    h: torch.Tensor,
    do: torch.Tensor,
    dh: torch.Tensor,
    scale: float,
    chunks: ChunkLayout,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk [B, T, G, N] (summed over each group's heads) and dg [B, T, H] fp32."""
    B, T, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    BK, BV = _block(N, _MAX_BK), _block(P, _MAX_BV)
    # One row per head; heads sharing a group are summed afterwards, in fp32.
    head_dtype = q.dtype if G == H else torch.float32
    dq = torch.empty(B, T, H, N, dtype=head_dtype, device=q.device)
    dk = torch.empty(B, T, H, N, dtype=head_dtype, device=q.device)
    dg = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    grid = (chunks.NT, B * H)
    chunk_ssd_bwd_kernel_dqkg[grid](
        q, k, v, gc, h, do, dh, dq, dk, dg, chunks.cu_seqlens, chunks.chunk_indices, scale, T,
        H=H, G=G, N=N, P=P, BT=chunks.BT, BK=BK, BV=BV, IS_VARLEN=chunks.varlen,
    )
    if G != H:
        dq = dq.view(B, T, G, H // G, N).sum(3).to(q.dtype)
        dk = dk.view(B, T, G, H // G, N).sum(3).to(k.dtype)
    return dq, dk, dg


def chunk_ssd_fwd(q, k, v, g, scale, initial_state, output_final_state, chunks):
    gc = chunk_local_cumsum(g, chunks)
    h, ht = chunk_fwd_h(k, v, gc, initial_state, output_final_state, chunks)
    o = chunk_fwd_o(q, k, v, gc, h, scale, chunks)
    return gc, o, ht


def chunk_ssd_bwd(q, k, v, gc, scale, initial_state, do, dht, want_dh0, chunks):
    # Recomputing h costs one pass over k and v, and keeps [chunks, H, N, P] out of saved memory.
    h, _ = chunk_fwd_h(k, v, gc, initial_state, False, chunks)
    dh, dh0 = chunk_bwd_dh(q, gc, do, dht, scale, want_dh0, chunks)
    dv = chunk_bwd_dv(q, k, gc, do, dh, scale, chunks)
    dq, dk, dg = chunk_bwd_dqkg(q, k, v, gc, h, do, dh, scale, chunks)
    return dq, dk, dv, dg, dh0


class ChunkSSDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, chunks):
        gc, o, ht = chunk_ssd_fwd(q, k, v, g, scale, initial_state, output_final_state, chunks)
        ctx.save_for_backward(q, k, v, gc, initial_state)
        ctx.scale, ctx.chunks, ctx.g_dtype = scale, chunks, g.dtype
        # Unused outputs then give None instead of zero tensors, which lets the kernels skip dht.
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, gc, initial_state = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dht = None if dht is None else dht.contiguous()
        want_dh0 = initial_state is not None and ctx.needs_input_grad[5]
        dq, dk, dv, dg, dh0 = chunk_ssd_bwd(q, k, v, gc, ctx.scale, initial_state, do, dht, want_dh0, ctx.chunks)
        return dq, dk, dv, dg.to(ctx.g_dtype), None, dh0, None, None


def chunk_ssd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Chunked SSD in Triton, differentiable in q, k, v, g and initial_state.

    Args:
        q, k: [B, T, G, N]; head h reads group h // (H // G).
        v: [B, T, H, P].
        g: [B, T, H] log decay (<= 0).
        scale: defaults to N ** -0.5.
        initial_state: [Nseq, H, N, P] or None (zeros).
        output_final_state: also return the state after the last token.
        cu_seqlens: [Nseq + 1] packed-sequence starts (then B == 1), or None (Nseq = B).
        chunk_size: tokens per chunk, a power of two >= 16.
    Returns:
        o [B, T, H, P] in v's dtype, and the final state [Nseq, H, N, P] fp32 or None.
    """
    B, T, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    if k.shape != q.shape or v.shape[:2] != (B, T) or g.shape != (B, T, H) or H % G != 0:
        shapes = ", ".join(f"{n} {tuple(x.shape)}" for n, x in zip("qkvg", (q, k, v, g)))
        raise ValueError(f"shapes {shapes} do not fit")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs batch size 1, got {B}")
    chunks = chunk_layout(B, T, chunk_size, cu_seqlens, q.device)
    if initial_state is not None:
        if initial_state.shape != (chunks.N, H, N, P):
            raise ValueError(f"initial_state {tuple(initial_state.shape)} != {(chunks.N, H, N, P)}")
        initial_state = initial_state.contiguous()
    scale = N**-0.5 if scale is None else scale
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    return ChunkSSDFunction.apply(q, k, v, g, scale, initial_state, output_final_state, chunks)
