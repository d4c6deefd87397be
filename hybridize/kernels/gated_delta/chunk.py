"""Chunked gated delta rule in Triton: forward (WY/UT -> states -> output) and backward, as one autograd.Function.

Every sequence (a batch row, or one of the cu_seqlens-packed sequences) is cut into chunks of BT tokens; a chunk
is named by (sequence i_n, chunk-in-sequence i_t), read from `chunk_indices` with varlen and computed from T
without, and its states live at index chunk_offsets[i_n] + i_t of the per-chunk buffers. Matmul operands are in
the input dtype, accumulators, gates and states in fp32. The math, including the gradients, is in README.md.
Block sizes BV, warps, pipeline depths (and, for the two backward kernels, a register cap) are autotuned on the GPU
(`hybridize.kernels.tuning`).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hybridize.kernels.gated_delta.inputs import (
    decay_gate, l2norm_bwd, l2norm_fwd, log_decay, token_rows, write_strength,
)
from hybridize.kernels.gated_delta.reference import GateParams, check_gate_params
from hybridize.kernels.tuning import autotune, chunk_range, configs
from hybridize.kernels.varlen import ChunkLayout, chunk_layout, first_chunk, flat_chunk_span, sequence_span

# Autotune: re-tuned per head size, chunk size, varlen or not (and dtypes), never per sequence length.
KEY = ["K", "V", "BT", "IS_VARLEN"]
# The sequential state passes: Triton software-pipelines their loop over chunks, so the depth matters.
STATE_CONFIGS = configs(BV=(32, 64), num_warps=(4, 8), num_stages=(2, 3, 4))
# The backward state pass keeps more tiles live: at K=128, BV=64 with 4 stages failed on the H100 (the
# every-config sweep), so its depth stops at 3.
STATE_BWD_CONFIGS = configs(BV=(32, 64), num_warps=(4, 8), num_stages=(2, 3))
# One program per chunk: nothing is pipelined (the V loops are short), so num_stages would change nothing. BV stays
# 64 in these kernels: on the H100 with Triton 3.6, _output_fwd_kernel with BV=32 and 4 warps (a [BT, BT] matmul
# result fed into an m64n32 wgmma) faults with an illegal memory access although every access it makes is in bounds
# (its compiled loads and stores are all masked), the known class of Hopper wgmma miscompiles (triton #10486, #11366).
CHUNK_CONFIGS = configs(BV=(64,), num_warps=(4, 8), num_stages=(2,))
# The WY kernel feeds its [BT, BT] inverse into a [BT, BK] matmul. At BK=16 in bf16 (an m64n16 wgmma) with 4 warps,
# Triton 3.6 on the H100 reads shared memory out of bounds (compute-sanitizer: chunk.py, the w store), which faulted
# or silently gave o 12% off; with 8 warps every config of every other kernel is right there (a probe
# of each config alone). At BK=64 and 128 the 4-warp config passed the every-config sweep and is the faster one:
# the B4 T4096 H16 D128 forward took 0.50 ms when autotuning could pick it, 0.76 ms with 8 warps only
# (docs/runs/kernels_h100_2026-11-23.md). So 4 warps are offered from BK=64 up; BK=32 keeps 8, as the
# narrow-wgmma class also hit _output_fwd at BV=32.
WY_FWD_CONFIGS = configs(BV=(64,), num_warps=(4, 8), num_stages=(2,))
WY_FWD_MIN_BK_FOR_4_WARPS = 64


def wy_fwd_safe_configs(configs: list[triton.Config], named_args: dict, **launch_kwargs) -> list[triton.Config]:
    """The WY kernel's configs that are right at this launch's BK (the autotuner's prune; see WY_FWD_CONFIGS)."""
    wide = launch_kwargs["BK"] >= WY_FWD_MIN_BK_FOR_4_WARPS
    return [c for c in configs if wide or c.num_warps >= 8]


# The two backward kernels that transpose a matmul result into another matmul: BV=64 and 8 warps only, the layout
# verified on Hopper with Triton 3.6, where other layouts of this pattern are miscompiled (fla issues #640, #984).
# Each config also comes capped at 128 registers a thread (ptxas .maxnreg: the same compiled layouts, only register
# allocation differs). Uncapped, _dqkw takes ~150 and _wy_bwd ~250 (sm_90, K=V=128), so one CTA of 8 warps per SM;
# capped, two fit and hide each other's memory latency, for ~16 (_dqkw) or ~420 (_wy_bwd) bytes of spills a thread.
# Autotuning keeps the faster.
_BWD_LAYOUTS = configs(BV=(64,), num_warps=(8,), num_stages=(2,))
BWD_CONFIGS = _BWD_LAYOUTS + [
    triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=128) for c in _BWD_LAYOUTS
]


@triton.jit
def _masked_exp(b_d, m):
    # exp(b_d) where m, 0 elsewhere; masked before exp so the unused triangle cannot overflow.
    return tl.where(m, tl.exp(tl.where(m, b_d, 0.0)), 0.0)


@triton.jit
def _chunk_gates(gc, bos, i_t, T, H: tl.constexpr, i_h, BT: tl.constexpr):
    """The chunk's cumulative log decays [BT] and the value at its last token.

    Rows past the sequence end read the last token's value, not 0: the decay factors exp(gc_i - gc_j), i >= j, stay
    <= 1 for them too. A 0 there made exp(0 - gc_j) overflow to inf once a chunk decays by more than e^88, and inf
    times the zero padding of q, k or do is NaN, which the next tl.dot spreads into the real rows.
    """
    i_end = tl.minimum(i_t * BT + BT, T) - 1
    b_g = tl.load(gc + (bos + tl.minimum(i_t * BT + tl.arange(0, BT), i_end)) * H + i_h)
    b_g_last = tl.load(gc + (bos + i_end) * H + i_h)
    return b_g, b_g_last


@triton.jit
def _solve_unit_lower(b_A, BT: tl.constexpr):
    """(I + A)^{-1} of a strictly lower [BT, BT] tile, by doubling the inverted diagonal blocks.

    With T the inverse of I + A on the diagonal blocks of size S, two sibling blocks merge into one of size 2S by
    [[X, 0], [A21, Y]]^{-1} = [[X^-1, 0], [-Y^-1 A21 X^-1, Y^-1]]: T <- T - T A_S T, A_S being A on the entries that
    join the siblings. Blocks of 2 need no matmul (T = I - A there); then log2(BT) - 1 doublings of two matmuls each
    (10 at BT = 64), where a row-by-row substitution would take BT - 1 steps of masked reductions over the whole tile.
    The matmuls run in tf32, like the rest of the fp32 matmuls here: the entries they form are the blocks of the
    inverse itself (no cancelling powers of A), and Ai meets bf16 operands wherever it is used.
    """
    o_i = tl.arange(0, BT)
    b_T = (o_i[:, None] == o_i[None, :]).to(tl.float32) - tl.where((o_i[:, None] ^ 1) == o_i[None, :], b_A, 0.0)
    for j in tl.static_range(1, BT.bit_length() - 1):
        # column in the sibling of the row's block of S = 2^j; from 1D indices, so that no [BT, BT] integer tile
        # stays live across the steps
        m_s = ((o_i ^ (1 << j))[:, None] >> j) == (o_i[None, :] >> j)
        b_T -= tl.dot(b_T, tl.dot(tl.where(m_s, b_A, 0.0), b_T))
    return b_T


@autotune(WY_FWD_CONFIGS, KEY, prune=wy_fwd_safe_configs)
@triton.jit
def _wy_fwd_kernel(
    k, v, s_v, g, s_g, beta, s_b, A_log, dt_bias, b_bias, gc, Ai, w, u, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, STORE_AI: tl.constexpr,
    RAW_GATES: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    _, i_t, bos, T = flat_chunk_span(cu_seqlens, chunk_indices, i_c, T, BT, IS_VARLEN)
    i_hk = i_h // (H // HK)
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T

    # g and beta as given, or formed from the raw a and b at RAW_GATES; rows at the token strides s_g, s_b
    b_g = log_decay(g, A_log, dt_bias, (bos + o_t) * s_g + i_h, m_t, i_h, RAW_GATES)
    b_b = write_strength(beta, b_bias, (bos + o_t) * s_b + i_h, m_t, i_h, RAW_GATES)
    # g is 0 past the end, so the padded rows of the cumsum hold the last token's value (see _chunk_gates)
    b_g = tl.cumsum(b_g, axis=0)
    tl.store(gc + (bos + o_t) * H + i_h, b_g, mask=m_t)

    p_k = tl.make_block_ptr(k + (bos * HK + i_hk) * K, (T, K), (HK * K, 1), (i_t * BT, 0), (BT, BK), (1, 0))
    b_k = tl.load(p_k, boundary_check=(0, 1), padding_option="zero")  # [BT, BK]
    # A_ij = beta_i (k_i . k_j) exp(gc_i - gc_j) for j < i; Ai = (I + A)^{-1}
    b_A = tl.dot(b_k, tl.trans(b_k)) * b_b[:, None]
    b_A = b_A * _masked_exp(b_g[:, None] - b_g[None, :], o_i[:, None] > o_i[None, :])
    b_Ai = _solve_unit_lower(b_A, BT)  # [BT, BT]
    if STORE_AI:  # only the backward reads it
        p_Ai = tl.make_block_ptr(Ai + (bos * H + i_h) * BT, (T, BT), (H * BT, 1), (i_t * BT, 0), (BT, BT), (1, 0))
        tl.store(p_Ai, b_Ai, boundary_check=(0, 1))

    b_Ai = b_Ai.to(b_k.dtype)
    # k again (from L2) rather than kept in registers across the solve, which already holds four [BT, BT] fp32 tiles
    b_k = tl.load(p_k, boundary_check=(0, 1), padding_option="zero")
    b_kb = (b_k * (b_b * tl.exp(b_g))[:, None]).to(b_k.dtype)
    p_w = tl.make_block_ptr(w + (bos * H + i_h) * K, (T, K), (H * K, 1), (i_t * BT, 0), (BT, BK), (1, 0))
    tl.store(p_w, tl.dot(b_Ai, b_kb).to(p_w.dtype.element_ty), boundary_check=(0, 1))
    for i_v in range(tl.cdiv(V, BV)):
        p_v = tl.make_block_ptr(v + bos * s_v + i_h * V, (T, V), (s_v, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        p_u = tl.make_block_ptr(u + (bos * H + i_h) * V, (T, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        b_v = tl.load(p_v, boundary_check=(0, 1), padding_option="zero")
        b_vb = (b_v * b_b[:, None]).to(b_v.dtype)
        tl.store(p_u, tl.dot(b_Ai, b_vb).to(p_u.dtype.element_ty), boundary_check=(0, 1))


@autotune(STATE_CONFIGS, KEY)
@triton.jit
def _state_fwd_kernel(
    k, w, u, gc, h, v_new, h0, ht, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_hk = i_h // (H // HK)
    boh = first_chunk(chunk_offsets, i_n, T, BT, IS_VARLEN)
    bos, T = sequence_span(cu_seqlens, i_n, T, IS_VARLEN)

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        p_h0 = tl.make_block_ptr(h0 + i_nh * K * V, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0))
        b_h = tl.load(p_h0, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    for i_t in chunk_range(tl.cdiv(T, BT)):
        p_h = tl.make_block_ptr(h + ((boh + i_t) * H + i_h) * K * V, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0))
        tl.store(p_h, b_h.to(p_h.dtype.element_ty), boundary_check=(0, 1))

        p_w = tl.make_block_ptr(w + (bos * H + i_h) * K, (T, K), (H * K, 1), (i_t * BT, 0), (BT, BK), (1, 0))
        p_u = tl.make_block_ptr(u + (bos * H + i_h) * V, (T, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        p_vn = tl.make_block_ptr(v_new + (bos * H + i_h) * V, (T, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV),
                                 (1, 0))
        b_w = tl.load(p_w, boundary_check=(0, 1), padding_option="zero")
        # What the chunk writes, given the state at its start: u - w h
        b_v = tl.load(p_u, boundary_check=(0, 1), padding_option="zero").to(tl.float32) - tl.dot(b_w, b_h.to(b_w.dtype))
        tl.store(p_vn, b_v.to(p_vn.dtype.element_ty), boundary_check=(0, 1))

        b_g, b_g_last = _chunk_gates(gc, bos, i_t, T, H, i_h, BT)
        p_kT = tl.make_block_ptr(k + (bos * HK + i_hk) * K, (K, T), (1, HK * K), (0, i_t * BT), (BK, BT), (0, 1))
        b_kT = tl.load(p_kT, boundary_check=(0, 1), padding_option="zero")  # [BK, BT]
        b_v = (b_v * tl.exp(b_g_last - b_g)[:, None]).to(b_kT.dtype)
        b_h = b_h * tl.exp(b_g_last) + tl.dot(b_kT, b_v)
    if STORE_HT:
        p_ht = tl.make_block_ptr(ht + i_nh * K * V, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0))
        tl.store(p_ht, b_h, boundary_check=(0, 1))


@autotune(CHUNK_CONFIGS, KEY)
@triton.jit
def _output_fwd_kernel(
    q, k, v_new, h, gc, o, scale, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, i_t, bos, T = flat_chunk_span(cu_seqlens, chunk_indices, i_c, T, BT, IS_VARLEN)
    i_hk = i_h // (H // HK)
    o_i = tl.arange(0, BT)

    p_q = tl.make_block_ptr(q + (bos * HK + i_hk) * K, (T, K), (HK * K, 1), (i_t * BT, 0), (BT, BK), (1, 0))
    p_kT = tl.make_block_ptr(k + (bos * HK + i_hk) * K, (K, T), (1, HK * K), (0, i_t * BT), (BK, BT), (0, 1))
    p_h = tl.make_block_ptr(h + (i_c.to(tl.int64) * H + i_h) * K * V, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0))
    b_q = tl.load(p_q, boundary_check=(0, 1), padding_option="zero")
    b_kT = tl.load(p_kT, boundary_check=(0, 1), padding_option="zero")
    b_h = tl.load(p_h, boundary_check=(0, 1), padding_option="zero")
    b_g, _ = _chunk_gates(gc, bos, i_t, T, H, i_h, BT)

    # o = scale (exp(gc) q h + (q k^T * decay, causal) v_new)
    b_o = tl.dot(b_q, b_h) * tl.exp(b_g)[:, None]  # [BT, BV]
    b_s = tl.dot(b_q, b_kT) * _masked_exp(b_g[:, None] - b_g[None, :], o_i[:, None] >= o_i[None, :])  # [BT, BT]
    p_vn = tl.make_block_ptr(v_new + (bos * H + i_h) * V, (T, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
    b_vn = tl.load(p_vn, boundary_check=(0, 1), padding_option="zero")
    b_o = (b_o + tl.dot(b_s.to(b_vn.dtype), b_vn)) * scale
    p_o = tl.make_block_ptr(o + (bos * H + i_h) * V, (T, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), boundary_check=(0, 1))


@autotune(CHUNK_CONFIGS, KEY)
@triton.jit
def _dv_local_kernel(
    q, k, gc, do, dv, scale, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    _, i_t, bos, T = flat_chunk_span(cu_seqlens, chunk_indices, i_c, T, BT, IS_VARLEN)
    i_hk = i_h // (H // HK)
    o_i = tl.arange(0, BT)

    p_k = tl.make_block_ptr(k + (bos * HK + i_hk) * K, (T, K), (HK * K, 1), (i_t * BT, 0), (BT, BK), (1, 0))
    p_qT = tl.make_block_ptr(q + (bos * HK + i_hk) * K, (K, T), (1, HK * K), (0, i_t * BT), (BK, BT), (0, 1))
    b_k = tl.load(p_k, boundary_check=(0, 1), padding_option="zero")
    b_qT = tl.load(p_qT, boundary_check=(0, 1), padding_option="zero")
    b_g, _ = _chunk_gates(gc, bos, i_t, T, H, i_h, BT)
    # The transposed intra-chunk attention: [j, i] = scale (q_i . k_j) exp(gc_i - gc_j) for i >= j
    b_sT = tl.dot(b_k, b_qT) * _masked_exp(b_g[None, :] - b_g[:, None], o_i[:, None] <= o_i[None, :]) * scale
    b_sT = b_sT.to(b_k.dtype)
    for i_v in range(tl.cdiv(V, BV)):
        p_do = tl.make_block_ptr(do + (bos * H + i_h) * V, (T, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        p_dv = tl.make_block_ptr(dv + (bos * H + i_h) * V, (T, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        b_do = tl.load(p_do, boundary_check=(0, 1), padding_option="zero")
        tl.store(p_dv, tl.dot(b_sT, b_do), boundary_check=(0, 1))


@autotune(STATE_BWD_CONFIGS, KEY)
@triton.jit
def _state_bwd_kernel(
    q, k, w, gc, do, dv_local, dv, dh, dht, dh0, cu_seqlens, chunk_offsets, T, scale,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_hk = i_h // (H // HK)
    boh = first_chunk(chunk_offsets, i_n, T, BT, IS_VARLEN)
    bos, T = sequence_span(cu_seqlens, i_n, T, IS_VARLEN)
    NT = tl.cdiv(T, BT)

    # b_dh: gradient of the state at the end of the current chunk, walking the chunks backwards
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        p_dht = tl.make_block_ptr(dht + i_nh * K * V, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0))
        b_dh = tl.load(p_dht, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    for i_r in chunk_range(NT):
        i_t = NT - 1 - i_r
        p_dh = tl.make_block_ptr(dh + ((boh + i_t) * H + i_h) * K * V, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0))
        tl.store(p_dh, b_dh.to(p_dh.dtype.element_ty), boundary_check=(0, 1))

        b_g, b_g_last = _chunk_gates(gc, bos, i_t, T, H, i_h, BT)
        p_k = tl.make_block_ptr(k + (bos * HK + i_hk) * K, (T, K), (HK * K, 1), (i_t * BT, 0), (BT, BK), (1, 0))
        p_dvl = tl.make_block_ptr(dv_local + (bos * H + i_h) * V, (T, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV),
                                  (1, 0))
        p_dv = tl.make_block_ptr(dv + (bos * H + i_h) * V, (T, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        b_k = tl.load(p_k, boundary_check=(0, 1), padding_option="zero")
        b_kd = (b_k * tl.exp(b_g_last - b_g)[:, None]).to(b_k.dtype)
        # gradient of v_new: its intra-chunk part plus what flows back through the end state
        b_dv = tl.load(p_dvl, boundary_check=(0, 1), padding_option="zero") + tl.dot(b_kd, b_dh.to(b_k.dtype))
        b_dv = b_dv.to(p_dv.dtype.element_ty)
        tl.store(p_dv, b_dv, boundary_check=(0, 1))

        p_qT = tl.make_block_ptr(q + (bos * HK + i_hk) * K, (K, T), (1, HK * K), (0, i_t * BT), (BK, BT), (0, 1))
        p_wT = tl.make_block_ptr(w + (bos * H + i_h) * K, (K, T), (1, H * K), (0, i_t * BT), (BK, BT), (0, 1))
        p_do = tl.make_block_ptr(do + (bos * H + i_h) * V, (T, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        b_qT = tl.load(p_qT, boundary_check=(0, 1), padding_option="zero")
        b_qg = (b_qT * (tl.exp(b_g) * scale)[None, :]).to(b_qT.dtype)
        b_wT = tl.load(p_wT, boundary_check=(0, 1), padding_option="zero")
        b_do = tl.load(p_do, boundary_check=(0, 1), padding_option="zero")
        b_dh = b_dh * tl.exp(b_g_last) + tl.dot(b_qg, b_do) - tl.dot(b_wT, b_dv)
    if STORE_DH0:
        p_dh0 = tl.make_block_ptr(dh0 + i_nh * K * V, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0))
        tl.store(p_dh0, b_dh, boundary_check=(0, 1))


@autotune(BWD_CONFIGS, KEY)
@triton.jit
def _dqkw_kernel(
    q, k, v_new, h, dh, do, dv, gc, dq, dk, dw, dg, scale, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # one program per (chunk, value head, BK-slice of K); the dg it writes is that slice's share. The slices of a
    # chunk are neighbours in launch order, so the second one finds do, v_new and dv (read whole by each) in L2.
    i_ck, i_h = tl.program_id(0), tl.program_id(1)
    i_c, i_k = i_ck // NK, i_ck % NK
    _, i_t, bos, T = flat_chunk_span(cu_seqlens, chunk_indices, i_c, T, BT, IS_VARLEN)
    i_hk = i_h // (H // HK)
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)  # rowsum(h * dh), for the decay of the whole chunk
    boh = (i_c.to(tl.int64) * H + i_h) * K * V  # this chunk's h and dh
    for i_v in range(tl.cdiv(V, BV)):
        p_h = tl.make_block_ptr(h + boh, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        p_dh = tl.make_block_ptr(dh + boh, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        p_do = tl.make_block_ptr(do + (bos * H + i_h) * V, (T, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        p_vn = tl.make_block_ptr(v_new + (bos * H + i_h) * V, (T, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV),
                                 (1, 0))
        p_dv = tl.make_block_ptr(dv + (bos * H + i_h) * V, (T, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        b_h = tl.load(p_h, boundary_check=(0, 1), padding_option="zero")  # [BK, BV]
        b_dh = tl.load(p_dh, boundary_check=(0, 1), padding_option="zero")  # [BK, BV]
        b_do = tl.load(p_do, boundary_check=(0, 1), padding_option="zero")  # [BT, BV]
        b_vn = tl.load(p_vn, boundary_check=(0, 1), padding_option="zero")  # [BT, BV]
        b_dv = tl.load(p_dv, boundary_check=(0, 1), padding_option="zero")  # [BT, BV]
        b_dq += tl.dot(b_do, tl.trans(b_h))
        b_dk += tl.dot(b_vn, tl.trans(b_dh))
        b_dw += tl.dot(b_dv, tl.trans(b_h))
        b_ds += tl.dot(b_do, tl.trans(b_vn))
        b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)

    p_q = tl.make_block_ptr(q + (bos * HK + i_hk) * K, (T, K), (HK * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
    p_k = tl.make_block_ptr(k + (bos * HK + i_hk) * K, (T, K), (HK * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
    b_q = tl.load(p_q, boundary_check=(0, 1), padding_option="zero")
    b_k = tl.load(p_k, boundary_check=(0, 1), padding_option="zero")
    b_g, b_g_last = _chunk_gates(gc, bos, i_t, T, H, i_h, BT)

    b_ds = b_ds * _masked_exp(b_g[:, None] - b_g[None, :], o_i[:, None] >= o_i[None, :]) * scale  # [BT, BT]
    b_dq = b_dq * (tl.exp(b_g) * scale)[:, None]  # the state part, [BT, BK]
    b_dk_state = b_dk * tl.exp(b_g_last - b_g)[:, None]
    # Gate gradient, per position of the cumulative sum: what every exp(gc) factor received. The state part is
    # q . dq_state. The attention part, each ds_ij (q_i . k_j) exp(gc_i - gc_j) adding to dgc_i and subtracting from
    # dgc_j, is taken from its fp32 terms, not as q . dq - k . dk of the whole dq, dk: there the diagonal (no decay,
    # so no gate gradient) cancels only up to the rounding of ds to the input dtype, an error of eps |q||dq| per
    # token, where the true value may be e^-50 of that (strong gates) or the sum of many such terms.
    b_dss = tl.where(o_i[:, None] > o_i[None, :], b_ds * tl.dot(b_q, tl.trans(b_k)), 0.0)  # [BT, BT]
    b_dg = tl.sum(b_q.to(tl.float32) * b_dq, 1) + tl.sum(b_dss, 1) - tl.sum(b_dss, 0)
    # This kernel's share of dg itself (g_t enters gc_i for i >= t): the scan from the chunk's end of the above, plus
    # the decay of the end state, which every g of the chunk reaches, and exp(gc_C - gc_j) k_j . dk_state_j for j < t
    # (g_t enters gc_C but not gc_j): a prefix sum of its own, not a total that the later terms are taken back from,
    # which would leave every dg_t an error of eps times the largest, latest term.
    b_kdk = tl.sum(b_k.to(tl.float32) * b_dk_state, 1)
    b_dg = tl.cumsum(b_dg, 0, reverse=True) + (tl.cumsum(b_kdk, 0) - b_kdk) + tl.sum(b_hdh) * tl.exp(b_g_last)
    b_ds = b_ds.to(b_q.dtype)
    b_dq += tl.dot(b_ds, b_k)
    b_dk = b_dk_state + tl.dot(tl.trans(b_ds), b_q)

    p_dq = tl.make_block_ptr(dq + (bos * H + i_h) * K, (T, K), (H * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
    p_dk = tl.make_block_ptr(dk + (bos * H + i_h) * K, (T, K), (H * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
    p_dw = tl.make_block_ptr(dw + (bos * H + i_h) * K, (T, K), (H * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
    tl.store(p_dq, b_dq.to(p_dq.dtype.element_ty), boundary_check=(0, 1))
    tl.store(p_dk, b_dk, boundary_check=(0, 1))
    tl.store(p_dw, (-b_dw).to(p_dw.dtype.element_ty), boundary_check=(0, 1))
    tl.store(dg + ((bos + o_t) * H + i_h) * NK + i_k, b_dg, mask=m_t)


@autotune(BWD_CONFIGS, KEY)
@triton.jit
def _wy_bwd_kernel(
    k, v, s_v, g, s_g, beta, s_b, A_log, dt_bias, b_bias, gc, Ai, dw, du, dk_in, dg_in, dk, dv, dbeta, dg, dparams,
    cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, IS_VARLEN: tl.constexpr,
    RAW_GATES: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    _, i_t, bos, T = flat_chunk_span(cu_seqlens, chunk_indices, i_c, T, BT, IS_VARLEN)
    i_hk = i_h // (H // HK)
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T

    p_Ai = tl.make_block_ptr(Ai + (bos * H + i_h) * BT, (T, BT), (H * BT, 1), (i_t * BT, 0), (BT, BT), (1, 0))
    b_Ai = tl.load(p_Ai, boundary_check=(0, 1), padding_option="zero")  # [BT, BT] fp32
    b_AiT = tl.trans(b_Ai).to(du.dtype.element_ty)
    b_g, _ = _chunk_gates(gc, bos, i_t, T, H, i_h, BT)
    b_b = write_strength(beta, b_bias, (bos + o_t) * s_b + i_h, m_t, i_h, RAW_GATES)

    # u = Ai (beta v)
    b_db = tl.zeros([BT], dtype=tl.float32)
    b_dAi = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        p_v = tl.make_block_ptr(v + bos * s_v + i_h * V, (T, V), (s_v, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        p_du = tl.make_block_ptr(du + (bos * H + i_h) * V, (T, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        p_dv = tl.make_block_ptr(dv + (bos * H + i_h) * V, (T, V), (H * V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        b_v = tl.load(p_v, boundary_check=(0, 1), padding_option="zero")
        b_du = tl.load(p_du, boundary_check=(0, 1), padding_option="zero")
        b_dvb = tl.dot(b_AiT, b_du)  # [BT, BV]
        tl.store(p_dv, (b_dvb * b_b[:, None]).to(p_dv.dtype.element_ty), boundary_check=(0, 1))
        b_db += tl.sum(b_dvb * b_v.to(tl.float32), 1)
        b_dAi += tl.dot(b_du, tl.trans((b_v * b_b[:, None]).to(b_v.dtype)))

    # w = Ai (beta exp(gc) k), in K slices of BK
    b_bg = b_b * tl.exp(b_g)
    b_dg = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        p_k = tl.make_block_ptr(k + (bos * HK + i_hk) * K, (T, K), (HK * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
        p_dw = tl.make_block_ptr(dw + (bos * H + i_h) * K, (T, K), (H * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
        b_k = tl.load(p_k, boundary_check=(0, 1), padding_option="zero")
        b_dw = tl.load(p_dw, boundary_check=(0, 1), padding_option="zero")
        b_dkbg_k = tl.sum(tl.dot(b_AiT, b_dw) * b_k.to(tl.float32), 1)
        b_db += b_dkbg_k * tl.exp(b_g)
        b_dg += b_dkbg_k * b_bg
        b_dAi += tl.dot(b_dw, tl.trans((b_k * b_bg[:, None]).to(b_k.dtype)))

    # Ai = (I + A)^{-1}  =>  dA = -Ai^T dAi Ai^T, on the strictly lower triangle where A lives
    m_lower = o_i[:, None] > o_i[None, :]
    b_dA = tl.dot(tl.dot(tl.trans(b_Ai), b_dAi), tl.trans(b_Ai))
    b_dA = tl.where(m_lower, -b_dA, 0.0) * _masked_exp(b_g[:, None] - b_g[None, :], m_lower)
    # A = beta_i (k_i . k_j) exp(gc_i - gc_j); b_dA now holds dA * exp(gc_i - gc_j). Through A: dk_i gets
    # sum_j M_ij k_j + sum_j M_ji k_j with M = beta_i b_dA_ij, dbeta_i gets sum_j b_dA_ij (k_i . k_j), and dgc gets the
    # row sums minus the column sums of M * (k_i . k_j). All three come from the same products M K, M^T K and
    # b_dA K as k_i . (those rows), slice by slice of K; the row and column sums read the same rounded M, so the
    # pairs inside a suffix of the chunk cancel in dg's reverse scan.
    b_dAb = (b_dA * b_b[:, None]).to(b_AiT.dtype)
    b_dA = b_dA.to(b_AiT.dtype)
    # dk = (the non-WY part) + through w's beta exp(gc) k + through A
    for i_k in range(tl.cdiv(K, BK)):
        p_k = tl.make_block_ptr(k + (bos * HK + i_hk) * K, (T, K), (HK * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
        p_dw = tl.make_block_ptr(dw + (bos * H + i_h) * K, (T, K), (H * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
        p_dki = tl.make_block_ptr(dk_in + (bos * H + i_h) * K, (T, K), (H * K, 1), (i_t * BT, i_k * BK), (BT, BK),
                                  (1, 0))
        p_dk = tl.make_block_ptr(dk + (bos * H + i_h) * K, (T, K), (H * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
        b_k = tl.load(p_k, boundary_check=(0, 1), padding_option="zero")
        b_dw = tl.load(p_dw, boundary_check=(0, 1), padding_option="zero")
        b_kf = b_k.to(tl.float32)
        b_Mk = tl.dot(b_dAb, b_k)  # [BT, BK]
        b_MTk = tl.dot(tl.trans(b_dAb), b_k)  # [BT, BK]
        b_db += tl.sum(tl.dot(b_dA, b_k) * b_kf, 1)
        b_dg += tl.sum(b_Mk * b_kf, 1) - tl.sum(b_MTk * b_kf, 1)
        b_dk = tl.dot(b_AiT, b_dw) * b_bg[:, None] + tl.load(p_dki, boundary_check=(0, 1), padding_option="zero")
        b_dk += b_Mk + b_MTk
        tl.store(p_dk, b_dk.to(p_dk.dtype.element_ty), boundary_check=(0, 1))

    # gc is a cumulative sum of g within the chunk, so dg is the reverse cumulative sum of dgc: a scan from the
    # chunk's end (padded rows zeroed first), not the total minus the prefix sum, which would leave every dg_t an
    # error of eps times the chunk's whole sum. The shares of `_dqkw` come summed already.
    b_dg = tl.cumsum(tl.where(m_t, b_dg, 0.0), 0, reverse=True)
    p_dgi = dg_in + ((bos + o_t) * H + i_h)[:, None] * NK + tl.arange(0, NK)[None, :]
    b_dg += tl.sum(tl.load(p_dgi, mask=m_t[:, None], other=0.0), 1)

    if RAW_GATES:
        # Through g = -exp(A_log) softplus(a + dt_bias) and beta = sigmoid(b + b_bias): da and db per token, and this
        # chunk's shares of the per-head sums, dA_log = sum dg g, ddt_bias = sum da, db_bias = sum db ([3, NC, H]).
        b_gt, b_slope = decay_gate(tl.load(g + (bos + o_t) * s_g + i_h, mask=m_t, other=0.0),
                                   tl.load(A_log + i_h).to(tl.float32), tl.load(dt_bias + i_h).to(tl.float32))
        b_dA_log = tl.sum(tl.where(m_t, b_dg * b_gt, 0.0))
        b_dg = tl.where(m_t, b_dg * b_slope, 0.0)
        b_db = tl.where(m_t, b_db * b_b * (1.0 - b_b), 0.0)
        NC = tl.num_programs(0)
        p_dp = dparams + i_c * H + i_h
        tl.store(p_dp, b_dA_log)
        tl.store(p_dp + NC * H, tl.sum(b_dg))
        tl.store(p_dp + 2 * NC * H, tl.sum(b_db))

    tl.store(dbeta + (bos + o_t) * H + i_h, b_db.to(dbeta.dtype.element_ty), mask=m_t)
    tl.store(dg + (bos + o_t) * H + i_h, b_dg.to(dg.dtype.element_ty), mask=m_t)


def _bk(K: int) -> int:
    """All of K in one tile, at least 16 (the smallest tl.dot side). BV, the V tile, is autotuned."""
    return max(16, triton.next_power_of_2(K))


def _launch_per_chunk(kernel, lay: ChunkLayout, *args, H: int, HK: int, K: int, V: int, **meta):
    """Run a kernel with one program per (chunk, value head)."""
    kernel[(lay.NC, H)](
        *args, lay.cu_seqlens, lay.chunk_indices, lay.T,
        H=H, HK=HK, K=K, V=V, BT=lay.BT, IS_VARLEN=lay.varlen, **meta,
    )


class _Gates(NamedTuple):
    """g and beta as the WY kernels read them: [B * T, H] rows at the token strides s_g, s_b. With `params`, they hold
    the raw a and b, which the kernels turn into the gate and beta (inputs.log_decay, inputs.write_strength)."""

    g: torch.Tensor
    s_g: int
    beta: torch.Tensor
    s_b: int
    params: GateParams | None

    def args(self) -> tuple:
        return self.g, self.s_g, self.beta, self.s_b, *(self.params or (None, None, None))


def _gates(g: torch.Tensor, beta: torch.Tensor, params: GateParams | None) -> _Gates:
    (g, s_g), (beta, s_b) = token_rows(g), token_rows(beta)
    return _Gates(g, s_g, beta, s_b, params)


def _token_strided(v: torch.Tensor) -> tuple[torch.Tensor, int]:
    """v [B, T, H, V] with every token's H * V values contiguous and one token stride, and that stride: v itself where
    it is laid out so (the split view of a fused projection is), else a contiguous copy."""
    rows, s_v = token_rows(v)
    return rows.view(v.shape), s_v


def _wy_fwd(k, v, s_v: int, gates: _Gates, lay: ChunkLayout, store_Ai: bool):
    """Chunk-local cumsum of g, Ai = (I + A)^{-1}, and the WY factors w = Ai (beta exp(gc) k), u = Ai (beta v).

    v is read at its token stride s_v. Ai is only written (and returned) when store_Ai: the backward needs it, a
    forward without gradients does not.
    """
    HK, K = k.shape[2], k.shape[3]
    H, V = v.shape[2], v.shape[3]
    gc = torch.empty(v.shape[:3], dtype=torch.float32, device=v.device)  # [B, T, H]
    Ai = torch.empty(*v.shape[:3], lay.BT, dtype=torch.float32, device=v.device) if store_Ai else None  # [B, T, H, BT]
    w = torch.empty(*v.shape[:3], K, dtype=k.dtype, device=k.device)  # [B, T, H, K]
    u = torch.empty(v.shape, dtype=v.dtype, device=v.device)  # [B, T, H, V]
    _launch_per_chunk(
        _wy_fwd_kernel, lay, k, v, s_v, *gates.args(), gc, Ai, w, u, H=H, HK=HK, K=K, V=V, BK=_bk(K),
        STORE_AI=store_Ai, RAW_GATES=gates.params is not None,
    )
    return gc, Ai, w, u


def _state_fwd(k, w, u, gc, initial_state, lay: ChunkLayout, output_final_state: bool):
    """The state at every chunk start (h), what each chunk writes (v_new), and the final states."""
    HK, K = k.shape[2], k.shape[3]
    H, V = u.shape[2], u.shape[3]
    h = torch.empty(lay.NC, H, K, V, dtype=k.dtype, device=k.device)
    v_new = torch.empty_like(u)
    ht = torch.empty(lay.N, H, K, V, dtype=torch.float32, device=k.device) if output_final_state else None
    _state_fwd_kernel[lambda meta: (triton.cdiv(V, meta["BV"]), lay.N * H)](
        k, w, u, gc, h, v_new, initial_state, ht, lay.cu_seqlens, lay.chunk_offsets, lay.T,
        H=H, HK=HK, K=K, V=V, BT=lay.BT, BK=_bk(K), IS_VARLEN=lay.varlen,
        USE_H0=initial_state is not None, STORE_HT=output_final_state,
    )
    return h, v_new, ht


def _output_fwd(q, k, v_new, h, gc, scale, lay: ChunkLayout):
    HK, K = q.shape[2], q.shape[3]
    H, V = v_new.shape[2], v_new.shape[3]
    o = torch.empty_like(v_new)
    _output_fwd_kernel[lambda meta: (triton.cdiv(V, meta["BV"]), lay.NC, H)](
        q, k, v_new, h, gc, o, scale, lay.cu_seqlens, lay.chunk_indices, lay.T,
        H=H, HK=HK, K=K, V=V, BT=lay.BT, BK=_bk(K), IS_VARLEN=lay.varlen,
    )
    return o


def _dv_local(q, k, gc, do, scale, lay: ChunkLayout):
    """The intra-chunk part of dv_new: the transposed causal attention of the chunk times do."""
    HK, K = q.shape[2], q.shape[3]
    H, V = do.shape[2], do.shape[3]
    dv_local = torch.empty(do.shape, dtype=torch.float32, device=do.device)
    _launch_per_chunk(_dv_local_kernel, lay, q, k, gc, do, dv_local, scale, H=H, HK=HK, K=K, V=V, BK=_bk(K))
    return dv_local


def _state_bwd(q, k, w, gc, do, dv_local, dht, scale, lay: ChunkLayout, need_dh0: bool):
    """Walking the chunks backwards: the end-state gradient of every chunk (dh), the full dv_new, and dh0."""
    HK, K = q.shape[2], q.shape[3]
    H, V = do.shape[2], do.shape[3]
    dh = torch.empty(lay.NC, H, K, V, dtype=q.dtype, device=q.device)
    dv = torch.empty(do.shape, dtype=q.dtype, device=q.device)
    dh0 = torch.empty(lay.N, H, K, V, dtype=torch.float32, device=q.device) if need_dh0 else None
    _state_bwd_kernel[lambda meta: (triton.cdiv(V, meta["BV"]), lay.N * H)](
        q, k, w, gc, do, dv_local, dv, dh, dht, dh0, lay.cu_seqlens, lay.chunk_offsets, lay.T, scale,
        H=H, HK=HK, K=K, V=V, BT=lay.BT, BK=_bk(K), IS_VARLEN=lay.varlen,
        USE_DHT=dht is not None, STORE_DH0=need_dh0,
    )
    return dh, dv, dh0


def _dqkw(q, k, v_new, h, dh, do, dv, gc, scale, lay: ChunkLayout):
    """dq in full, dk and dg without their WY parts, and dw (per value head); dg in [B, T, H, NK] shares.

    dq is per value head, in `_per_head_grad_dtype`.
    """
    B, T, HK, K = q.shape
    H, V = do.shape[2], do.shape[3]
    dq = torch.empty(B, T, H, K, dtype=_per_head_grad_dtype(q, H), device=q.device)
    dk = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
    dw = torch.empty(B, T, H, K, dtype=q.dtype, device=q.device)
    BK = _bk(K)
    # K is cut in slices of 64 to keep the three [BT, BK] accumulators in registers; each slice adds its dgc share.
    NK = triton.cdiv(BK, 64)
    dg = torch.empty(B, T, H, NK, dtype=torch.float32, device=q.device)
    _dqkw_kernel[(lay.NC * NK, H)](
        q, k, v_new, h, dh, do, dv, gc, dq, dk, dw, dg, scale, lay.cu_seqlens, lay.chunk_indices, lay.T,
        H=H, HK=HK, K=K, V=V, BT=lay.BT, BK=BK // NK, NK=NK, IS_VARLEN=lay.varlen,
    )
    return dq, dk, dw, dg


def _wy_bwd(k, v, s_v: int, gates: _Gates, gc, Ai, dw, du, dk_in, dg_in, lay: ChunkLayout):
    """Back through w and u: the full dk (per value head), dv, dbeta, and dg (its WY part scanned, plus dg_in).

    dk_in, dg_in: the non-WY parts from `_dqkw`. dv is in v's dtype, dk in `_per_head_grad_dtype`, dg and dbeta
    [B, T, H] in those of g and beta. With raw gates, dg and dbeta are da and db, and dparams [3, NC, H] fp32 holds
    every chunk's shares of dA_log, ddt_bias, db_bias (else None).
    """
    HK, K = k.shape[2], k.shape[3]
    H, V = v.shape[2], v.shape[3]
    dk = torch.empty(dk_in.shape, dtype=_per_head_grad_dtype(k, H), device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dbeta = torch.empty(v.shape[:3], dtype=gates.beta.dtype, device=v.device)
    dg = torch.empty(v.shape[:3], dtype=gates.g.dtype, device=v.device)
    raw = gates.params is not None
    dparams = torch.empty(3, lay.NC, H, dtype=torch.float32, device=v.device) if raw else None
    # K is walked in slices of 64 (twice: the dA pass, then dk), to keep the [BT, BK] tiles in registers.
    _launch_per_chunk(
        _wy_bwd_kernel, lay, k, v, s_v, *gates.args(), gc, Ai, dw, du, dk_in, dg_in, dk, dv, dbeta, dg, dparams,
        H=H, HK=HK, K=K, V=V, BK=min(_bk(K), 64), NK=dg_in.shape[-1], RAW_GATES=raw,
    )
    return dk, dv, dbeta, dg, dparams


def _per_head_grad_dtype(x: torch.Tensor, H: int) -> torch.dtype:
    """dtype of a per-value-head gradient of q or k ([B, T, HK, K]): x's own when every value head has its own
    q/k head (nothing to sum), else fp32, the precision `_sum_groups` adds the group's shares in."""
    return x.dtype if x.shape[2] == H else torch.float32


def _sum_groups(x: torch.Tensor, HK: int) -> torch.Tensor:
    """Gradients per value head [B, T, H, K] -> per shared q/k head [B, T, HK, K] (as is when H == HK)."""
    B, T, H, K = x.shape
    return x if H == HK else x.view(B, T, HK, H // HK, K).sum(3)


def _fwd(q, k, v, s_v, gates: _Gates, scale, initial_state, output_final_state, lay: ChunkLayout, store_Ai: bool):
    """cumsum -> WY (w, u) -> states h -> output o. Returns o, the final states, and what the backward reads."""
    gc, Ai, w, u = _wy_fwd(k, v, s_v, gates, lay, store_Ai)
    h, v_new, ht = _state_fwd(k, w, u, gc, initial_state, lay, output_final_state)
    o = _output_fwd(q, k, v_new, h, gc, scale, lay)
    return o, ht, gc, Ai, w, h, v_new


def _bwd(q, k, v, s_v, gates: _Gates, gc, Ai, w, h, v_new, scale, need_dh0, do, dht, lay: ChunkLayout):
    """dv_new within chunks -> dh backwards -> dq, dk, dw -> back through WY (dk, dv, dbeta, dg).

    h, v_new: the forward's per-chunk states and what each chunk wrote. dq, dk are per value head ([B, T, H, K]);
    dparams as in `_wy_bwd`.
    """
    dv_local = _dv_local(q, k, gc, do, scale, lay)
    dh, dv_new, dh0 = _state_bwd(q, k, w, gc, do, dv_local, dht, scale, lay, need_dh0)
    dq, dk, dw, dgc = _dqkw(q, k, v_new, h, dh, do, dv_new, gc, scale, lay)
    dk, dv, dbeta, dg, dparams = _wy_bwd(k, v, s_v, gates, gc, Ai, dw, dv_new, dk, dgc, lay)
    return dq, dk, dv, dg, dbeta, dparams, dh0


class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    """Saves the gates, w and Ai of the WY form, the per-chunk states h and v_new (with qk_l2norm also the normalized
    q, k and their rstd instead of q, k). With gate params, g and beta are the raw a and b.

    Keeping h and v_new, where the backward could recompute them from w and u by one more sequential pass over the
    chunks, costs H K V / BT values a token more (v_new takes u's place): one v more at K = V = BT = 64, two at
    K = V = 128.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, beta, A_log, dt_bias, b_bias, scale, initial_state, output_final_state, cu_seqlens,
                chunk_size, qk_l2norm):
        lay = chunk_layout(q.shape[0], q.shape[1], chunk_size, cu_seqlens, q.device)
        params = None if A_log is None else GateParams(A_log, dt_bias, b_bias)
        gates = _gates(g, beta, params)
        rstd = (None, None)
        if qk_l2norm:
            q, k, *rstd = l2norm_fwd(q, k)
        v, s_v = _token_strided(v)
        o, ht, gc, Ai, w, h, v_new = _fwd(
            q, k, v, s_v, gates, scale, initial_state, output_final_state, lay, store_Ai=any(ctx.needs_input_grad)
        )
        ctx.save_for_backward(q, k, v, gates.g, gates.beta, A_log, dt_bias, b_bias, gc, Ai, w, h, v_new, *rstd)
        ctx.lay, ctx.scale, ctx.qk_l2norm, ctx.strides = lay, scale, qk_l2norm, (s_v, gates.s_g, gates.s_b)
        ctx.need_dh0 = initial_state is not None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, A_log, dt_bias, b_bias, gc, Ai, w, h, v_new, rstd_q, rstd_k = ctx.saved_tensors
        params = None if A_log is None else GateParams(A_log, dt_bias, b_bias)
        s_v, s_g, s_b = ctx.strides
        gates = _Gates(g, s_g, beta, s_b, params)
        dq, dk, dv, dg, dbeta, dparams, dh0 = _bwd(
            q, k, v, s_v, gates, gc, Ai, w, h, v_new, ctx.scale, ctx.need_dh0, do.contiguous(),
            None if dht is None else dht.contiguous(), ctx.lay,
        )
        if ctx.qk_l2norm:
            dq, dk = l2norm_bwd(dq, dk, q, k, rstd_q, rstd_k)
        else:
            dq, dk = _sum_groups(dq, q.shape[2]).to(q.dtype), _sum_groups(dk, k.shape[2]).to(k.dtype)
        # the per-head parameters: one sum of the chunks' shares
        dparams = (None, None, None) if params is None else [d.to(p.dtype) for d, p in zip(dparams.sum(1), params)]
        return (dq, dk, dv, dg, dbeta, *dparams, None, dh0, None, None, None, None)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    gate_params: GateParams | None = None,
    qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over whole sequences, chunked, in Triton (differentiable).

    Args:
        q, k: [B, T, HK, K], used as given (normalize them before), or L2-normalized inside with qk_l2norm.
            v: [B, T, H, V], H a multiple of HK; value head h reads q/k head h // (H // HK). q, k, v share one
            dtype. K <= 128; K, V >= 16 work best.
        g: [B, T, H] log decay (<= 0), fp32 or the input dtype. beta: [B, T, H].
        scale: output scale, default K ** -0.5.
        initial_state: [N, H, K, V] fp32 or None. output_final_state: also return the final states.
        cu_seqlens: [N + 1] cumulative starts of N sequences packed along T (then B == 1), or None (N = B).
        chunk_size: tokens per chunk, a power of two in [16, 64].
        gate_params: GateParams(A_log, dt_bias, b_bias), each [H]: then g and beta are the raw a and b, and the op
            forms g = -exp(A_log) softplus(a + dt_bias) and beta = sigmoid(b + b_bias) itself (in fp32), with
            gradients to a, b and the three parameters.
        qk_l2norm: q and k are raw; the op uses q / sqrt(|q|^2 + 1e-6) (and k so), with gradients to the raw q, k.
    Returns:
        o: [B, T, H, V] in v's dtype; final_state: [N, H, K, V] fp32, or None.
    """
    B, T, HK, K = q.shape
    H = v.shape[2]
    if k.shape != q.shape or v.shape[:2] != (B, T) or H % HK or g.shape != (B, T, H) or beta.shape != g.shape:
        raise ValueError(f"shapes q {q.shape} k {k.shape} v {v.shape} g {g.shape} beta {beta.shape} do not fit")
    if K > 128 or chunk_size not in (16, 32, 64):
        raise ValueError(f"need K <= 128 and chunk_size in (16, 32, 64), got K={K}, chunk_size={chunk_size}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs batch size 1, got {B}")
    check_gate_params(gate_params, H)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        if initial_state.shape != (N, H, K, v.shape[3]):
            raise ValueError(f"initial_state must be {(N, H, K, v.shape[3])}, got {tuple(initial_state.shape)}")
        initial_state = initial_state.float().contiguous()
    scale = K**-0.5 if scale is None else scale
    # raw q, k are read at their token stride by the norm's prologue; v, g and beta by the WY kernels
    if not qk_l2norm:
        q, k = q.contiguous(), k.contiguous()
    params = (None, None, None) if gate_params is None else (p.contiguous() for p in gate_params)
    return ChunkGatedDeltaRuleFunction.apply(
        q, k, v, g, beta, *params, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
        qk_l2norm,
    )
