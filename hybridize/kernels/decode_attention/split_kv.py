"""Split-KV ("flash-decoding") attention for one new token per sequence over static KV slots, in Triton.

The key axis of every (batch row, KV head) is cut into splits that run as separate programs, so a small batch
still fills the GPU; each split writes a partial softmax (running max m, sum l, unnormalised output acc) and a
second small kernel merges the splits. The math and the split rule are in README.md.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from hybridize.kernels.tuning import autotune, chunk_range

from .reference import check_args

# Programs aimed at per SM: with several resident per SM, one program's tile loads are in flight while another
# waits, which a memory-bound kernel needs to keep HBM busy. 4 is a starting point, not yet measured.
PROGRAMS_PER_SM = 4
# A split holds a multiple of SPLIT_KEYS keys (so every BS below divides it): fewer keys would not pay for
# loading the query rows and writing the partial.
SPLIT_KEYS = 128
# The merge kernel holds all splits of a row in one tile.
MAX_SPLITS = 64
# When Triton runs interpreted (CPU tests), split as an H100 would.
NOMINAL_SMS = 132
# Query rows per program: the G <= 16 heads of a KV head, padded to 16, the smallest tl.dot side. Padding wastes
# tensor-core work, of which there is plenty; broadcast-multiply-sum instead would need a cross-warp reduction over
# D and over the keys for each query row and each tile, which costs more than the idle MMA rows.
BG = 16
MAX_GROUP = BG

# K/V tile BS, warps and pipeline depth, tuned on the GPU per split length, group, head size and dtype; the first
# config is what the interpreter runs. Configs that do not fit in shared memory are skipped by the autotuner.
SPLIT_CONFIGS = [
    triton.Config({"BS": bs}, num_warps=w, num_stages=s) for bs in (64, 128) for w in (4, 8) for s in (2, 3, 4)
]


@autotune(SPLIT_CONFIGS, key=["SPLIT_LEN", "G", "D"])
@triton.jit
def _split_kernel(
    q, k, v, valid, m_part, l_part, acc_part, qk_scale,
    s_kb, s_kh, s_ks, s_kd, s_vb, s_vh, s_vs, s_vd, S, SPLIT_LEN, NS,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    o_g, o_d, o_s = tl.arange(0, BG), tl.arange(0, BD), tl.arange(0, BS)
    m_g, m_d = o_g < G, o_d < D

    # padded query rows are zero: their scores are finite, and they are never stored
    b_q = tl.load(q + (i_bh * G + o_g[:, None]) * D + o_d[None, :], mask=m_g[:, None] & m_d[None, :], other=0.0)
    b_q = b_q.to(k.dtype.element_ty)  # [BG, BD], tl.dot takes one operand dtype
    p_k = k + i_b.to(tl.int64) * s_kb + i_h.to(tl.int64) * s_kh
    p_v = v + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh
    p_valid = valid + i_b.to(tl.int64) * S
    start = i_s * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, S)

    # scores are in log2 units (qk_scale holds log2 e), so exp2 is the exponential throughout
    b_m = tl.full([BG], float("-inf"), tl.float32)
    b_l = tl.zeros([BG], tl.float32)
    b_acc = tl.zeros([BG, BD], tl.float32)
    for i_t in chunk_range(tl.cdiv(end - start, BS)):
        o_t = start + i_t * BS + o_s
        m_t = o_t < end
        # invalid slots are never loaded: they cost no bandwidth, and garbage there cannot leak in as 0 * NaN
        m_t = m_t & (tl.load(p_valid + o_t, mask=m_t, other=0) != 0)  # [BS]
        m_kv = m_t[:, None] & m_d[None, :]
        b_k = tl.load(p_k + o_t[:, None] * s_ks + o_d[None, :] * s_kd, mask=m_kv, other=0.0)  # [BS, BD]
        b_v = tl.load(p_v + o_t[:, None] * s_vs + o_d[None, :] * s_vd, mask=m_kv, other=0.0)  # [BS, BD]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale  # [BG, BS]
        b_s = tl.where(m_t[None, :], b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))  # [BG]
        # while a row has seen no valid key its max is -inf; shifting by 0 then gives p = alpha = 0, not NaN
        b_shift = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_p = tl.exp2(b_s - b_shift[:, None])  # [BG, BS]
        b_alpha = tl.exp2(b_m - b_shift)  # [BG]
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
        b_m = b_mn

    o_row = (i_bh * NS + i_s) * G + o_g  # [BG] row of the [B*Hkv, NS, G] partials
    tl.store(m_part + o_row, b_m, mask=m_g)
    tl.store(l_part + o_row, b_l, mask=m_g)
    tl.store(acc_part + o_row[:, None] * D + o_d[None, :], b_acc, mask=m_g[:, None] & m_d[None, :])


@triton.jit
def _merge_kernel(m_part, l_part, acc_part, o, NS, G: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                  BD: tl.constexpr):
    i_bhg = tl.program_id(0)
    i_bh, i_g = i_bhg // G, i_bhg % G
    o_n, o_d = tl.arange(0, BN), tl.arange(0, BD)
    m_n, m_d = o_n < NS, o_d < D
    o_row = (i_bh * NS + o_n) * G + i_g  # [BN] this query row in every split

    b_m = tl.load(m_part + o_row, mask=m_n, other=float("-inf"))  # [BN]
    b_l = tl.load(l_part + o_row, mask=m_n, other=0.0)  # [BN]
    b_acc = tl.load(acc_part + o_row[:, None] * D + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
    b_mx = tl.max(b_m, 0)
    # splits that saw no valid key (m = -inf) get weight 0; if none did, every weight is 0 and so is the output
    b_w = tl.exp2(b_m - tl.where(b_mx == float("-inf"), 0.0, b_mx))  # [BN]
    b_l = tl.sum(b_w * b_l, 0)
    b_o = tl.sum(b_w[:, None] * b_acc, 0) / tl.where(b_l > 0, b_l, 1.0)  # [BD]
    tl.store(o + i_bhg * D + o_d, b_o.to(o.dtype.element_ty), mask=m_d)


@functools.lru_cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else NOMINAL_SMS


def split_plan(S: int, heads: int, *, sms: int) -> tuple[int, int]:
    """(number of splits, keys per split) for S keys in each of `heads` = B*Hkv rows.

    Aim at PROGRAMS_PER_SM * sms programs in all, with splits of a multiple of SPLIT_KEYS keys and at most
    MAX_SPLITS of them; then re-count, so that no split starts past S.
    """
    splits = max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, heads), triton.cdiv(S, SPLIT_KEYS), MAX_SPLITS))
    split_len = triton.cdiv(triton.cdiv(S, splits), SPLIT_KEYS) * SPLIT_KEYS
    return triton.cdiv(S, split_len), split_len


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """One query token per sequence against S cached slots (no autograd).

    Args:
        q: [B, Hkv, G, D] the G query heads sharing each KV head, as rows; G <= 16.
        keys, values: [B, Hkv, S, D] (any strides), bf16 / fp16 / fp32.
        valid: [B, S] bool, the slots that hold a real token.
        scale: logit scale, default D ** -0.5.
    Returns:
        out: [B, Hkv, G, D] in q's dtype; rows with no valid slot are 0.
    """
    check_args(q, keys, values, valid)
    if q.shape[2] > MAX_GROUP:
        raise ValueError(f"at most {MAX_GROUP} query heads per KV head, got {q.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    launch = _decode_attention_op if torch.compiler.is_compiling() else _decode_attention
    return launch(q.contiguous(), keys, values, valid.contiguous(), scale)


def _decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, scale: float
) -> torch.Tensor:
    B, HKV, G, D = q.shape
    S = keys.shape[2]
    NS, split_len = split_plan(S, B * HKV, sms=_sm_count(q.device))
    m_part = torch.empty(B * HKV, NS, G, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(B * HKV, NS, G, D, dtype=torch.float32, device=q.device)
    o = torch.empty_like(q)
    BD = max(16, triton.next_power_of_2(D))
    # fp32 operands would go through tf32 by default: 10 mantissa bits, far from the fp32 reference
    precision = "ieee" if keys.dtype == torch.float32 else "tf32"
    _split_kernel[(B * HKV, NS)](
        q, keys, values, valid.view(torch.uint8), m_part, l_part, acc_part, scale * math.log2(math.e),
        *keys.stride(), *values.stride(), S, split_len, NS,
        HKV=HKV, G=G, D=D, BG=BG, BD=BD, DOT_PRECISION=precision,
    )
    _merge_kernel[(B * HKV * G,)](
        m_part, l_part, acc_part, o, NS, G=G, D=D, BN=triton.next_power_of_2(NS), BD=BD, num_warps=4,
    )
    return o


# torch.compile keeps the two launches as this one opaque op instead of tracing them and the torch.empty buffers
# they fill; it writes no input. Eager calls skip its ~15 us dispatch.
_decode_attention_op = torch.library.custom_op("hybridize::decode_attention", _decode_attention, mutates_args=())


@_decode_attention_op.register_fake
def _(q, keys, values, valid, scale):
    return q.new_empty(q.shape)
