"""Split-KV ("flash-decoding") attention for one new token per sequence over static KV slots, in Triton.

The key axis of every (batch row, KV head) is cut into splits that run as separate programs, so a small batch
still fills the GPU; each split writes a partial softmax (running max m, sum l, unnormalised output acc), and the
last split of a row to finish (an atomic count per row) merges the row's partials in the same launch. The math and
the split rule are in README.md.
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
# More splits than this would only add partials for the merge to read.
MAX_SPLITS = 64
# The merging program reads the partials of this many splits at a time ([splits, BG, BD] fp32 in registers).
MERGE_SPLITS = 8
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
    q, k, v, valid, m_part, l_part, acc_part, arrived, o, qk_scale,
    s_kb, s_kh, s_ks, s_kd, s_vb, s_vh, s_vs, s_vd, S, SPLIT_LEN, NS,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    MS: tl.constexpr, DOT_PRECISION: tl.constexpr,
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

    m_out = m_g[:, None] & m_d[None, :]
    p_o = o + (i_bh * G + o_g[:, None]) * D + o_d[None, :]  # [BG, BD] this row's G outputs
    if NS == 1:  # the split is the whole row: nothing to merge
        tl.store(p_o, (b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]).to(o.dtype.element_ty), mask=m_out)
    else:
        o_row = (i_bh * NS + i_s) * G + o_g  # [BG] row of the [B*Hkv, NS, G] partials
        tl.store(m_part + o_row, b_m, mask=m_g)
        tl.store(l_part + o_row, b_l, mask=m_g)
        tl.store(acc_part + o_row[:, None] * D + o_d[None, :], b_acc, mask=m_out)
        # Every thread's stores issued (the barrier), then the count (acq_rel, one thread): this split's partial is
        # visible to whichever split of the row counts last, and that one reads every partial after its count.
        tl.debug_barrier()
        if tl.atomic_add(arrived + i_bh, 1) == NS - 1:
            _merge_row(m_part, l_part, acc_part, p_o, i_bh, NS, G, D, BG, BD, MS, m_out)
            tl.atomic_xchg(arrived + i_bh, 0)  # ready for the next launch (a CUDA graph replays this one)


@triton.jit
def _merge_row(m_part, l_part, acc_part, p_o, i_bh, NS, G: tl.constexpr, D: tl.constexpr, BG: tl.constexpr,
               BD: tl.constexpr, MS: tl.constexpr, m_out):
    """o = sum_i exp2(m_i - m) acc_i / sum_i exp2(m_i - m) l_i over the NS partials of row i_bh, MS splits at a time
    merged into a running (m, l, acc) like the tiles of a split."""
    o_n, o_g, o_d = tl.arange(0, MS), tl.arange(0, BG), tl.arange(0, BD)
    b_m = tl.full([BG], float("-inf"), tl.float32)
    b_l = tl.zeros([BG], tl.float32)
    b_acc = tl.zeros([BG, BD], tl.float32)
    for i_n in range(0, tl.cdiv(NS, MS)):
        n = i_n * MS + o_n  # [MS] split index
        rows = (i_bh * NS + n[:, None]) * G + o_g[None, :]  # [MS, BG] rows of the partials
        m_rows = (n[:, None] < NS) & (o_g[None, :] < G)
        # .cg: read past L1, which the other SMs' writes do not update
        b_ms = tl.load(m_part + rows, mask=m_rows, other=float("-inf"), cache_modifier=".cg")  # [MS, BG]
        b_ls = tl.load(l_part + rows, mask=m_rows, other=0.0, cache_modifier=".cg")  # [MS, BG]
        b_accs = tl.load(acc_part + rows[:, :, None] * D + o_d[None, None, :],
                         mask=m_rows[:, :, None] & (o_d < D)[None, None, :], other=0.0,
                         cache_modifier=".cg")  # [MS, BG, BD]
        b_mn = tl.maximum(b_m, tl.max(b_ms, 0))  # [BG]
        # splits that saw no valid key (m = -inf) get weight 0; while none did, the shift is 0, not -inf
        b_shift = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_w = tl.exp2(b_ms - b_shift[None, :])  # [MS, BG]
        b_alpha = tl.exp2(b_m - b_shift)  # [BG]
        b_l = b_l * b_alpha + tl.sum(b_w * b_ls, 0)
        b_acc = b_acc * b_alpha[:, None] + tl.sum(b_w[:, :, None] * b_accs, 0)
        b_m = b_mn
    tl.store(p_o, (b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]).to(p_o.dtype.element_ty), mask=m_out)


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
    m_part = torch.empty(B * HKV, NS, G, dtype=torch.float32, device=q.device)  # unused if NS == 1
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(B * HKV, NS, G, D, dtype=torch.float32, device=q.device)
    o = torch.empty_like(q)
    BD = max(16, triton.next_power_of_2(D))
    # fp32 operands would go through tf32 by default: 10 mantissa bits, far from the fp32 reference
    precision = "ieee" if keys.dtype == torch.float32 else "tf32"
    _split_kernel[(B * HKV, NS)](
        q, keys, values, valid.view(torch.uint8), m_part, l_part, acc_part, _arrival_counts(B * HKV, q.device), o,
        scale * math.log2(math.e), *keys.stride(), *values.stride(), S, split_len, NS,
        HKV=HKV, G=G, D=D, BG=BG, BD=BD, MS=min(MERGE_SPLITS, triton.next_power_of_2(NS)), DOT_PRECISION=precision,
    )
    return o


# Per device, the rows' arrival counts: zero between launches (each launch's merging programs reset theirs), so they
# are allocated and zeroed once, before any CUDA graph capture (the decoder warms up first). A larger batch gets a
# larger buffer; the smaller ones stay alive, since a captured graph may still point at them.
_counts: dict[torch.device, list[torch.Tensor]] = {}


def _arrival_counts(rows: int, device: torch.device) -> torch.Tensor:
    buffers = _counts.setdefault(device, [])
    if not buffers or buffers[-1].numel() < rows:
        buffers.append(torch.zeros(max(rows, 4096), dtype=torch.int32, device=device))
    return buffers[-1]


# torch.compile keeps the two launches as this one opaque op instead of tracing them and the torch.empty buffers
# they fill; it writes no input. Eager calls skip its ~15 us dispatch.
_decode_attention_op = torch.library.custom_op("hybridize::decode_attention", _decode_attention, mutates_args=())


@_decode_attention_op.register_fake
def _(q, keys, values, valid, scale):
    return q.new_empty(q.shape)
