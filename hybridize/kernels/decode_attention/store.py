"""The decode step's RoPE and K/V slot writes in one Triton kernel: one launch per attention layer and token, where
the rotation, the ring write and the sink write were several element-wise kernels."""

import torch
import triton
import triton.language as tl

from hybridize.kernels.layout import batch_rows


@triton.jit
def _rotated(x, c1, c2, s1, s2, o, m, HALF: tl.constexpr):
    """Llama's RoPE of the head at x (rotate-half): fp32 halves (x1 cos1 - x2 sin1, x2 cos2 + x1 sin2)."""
    x1 = tl.load(x + o, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF + o, mask=m, other=0.0).to(tl.float32)
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


@triton.jit
def _store_head(keys, values, r1, r2, v1, v2, o, m, HALF: tl.constexpr):
    tl.store(keys + o, r1, mask=m)
    tl.store(keys + HALF + o, r2, mask=m)
    tl.store(values + o, v1, mask=m)
    tl.store(values + HALF + o, v2, mask=m)


@triton.jit
def _rope_store_kernel(
    q, k, v, cos, sin, keys, values, slot, sink_slot, q_out,
    s_qb, s_kb, s_vb, s_cb, s_sb, s_kcb, s_kch, s_kcs, s_vcb, s_vch, s_vcs,
    H: tl.constexpr, HALF: tl.constexpr, BH: tl.constexpr,
):
    i_b, i_h = tl.program_id(0), tl.program_id(1)  # one program per row and head: H query heads, then the KV heads
    o = tl.arange(0, BH)
    m = o < HALF
    c1 = tl.load(cos + i_b * s_cb + o, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cos + i_b * s_cb + HALF + o, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sin + i_b * s_sb + o, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sin + i_b * s_sb + HALF + o, mask=m, other=0.0).to(tl.float32)
    if i_h < H:
        r1, r2 = _rotated(q + i_b * s_qb + i_h * 2 * HALF, c1, c2, s1, s2, o, m, HALF)
        p_out = q_out + (i_b * H + i_h) * 2 * HALF
        tl.store(p_out + o, r1.to(q_out.dtype.element_ty), mask=m)
        tl.store(p_out + HALF + o, r2.to(q_out.dtype.element_ty), mask=m)
    else:
        i_kv = i_h - H
        # names of their own: a variable of both branches must have one type where they join (compiled Triton)
        k1, k2 = _rotated(k + i_b * s_kb + i_kv * 2 * HALF, c1, c2, s1, s2, o, m, HALF)
        k1, k2 = k1.to(keys.dtype.element_ty), k2.to(keys.dtype.element_ty)
        p_v = v + i_b * s_vb + i_kv * 2 * HALF
        v1 = tl.load(p_v + o, mask=m, other=0.0).to(values.dtype.element_ty)
        v2 = tl.load(p_v + HALF + o, mask=m, other=0.0).to(values.dtype.element_ty)
        p_k = keys + i_b.to(tl.int64) * s_kcb + i_kv * s_kch
        p_vc = values + i_b.to(tl.int64) * s_vcb + i_kv * s_vch
        ring = tl.load(slot)
        _store_head(p_k + ring * s_kcs, p_vc + ring * s_vcs, k1, k2, v1, v2, o, m, HALF)
        sink = tl.load(sink_slot + i_b)
        if sink >= 0:  # the row's token is one of its first `sinks`: also kept in its sink slot
            _store_head(p_k + sink * s_kcs, p_vc + sink * s_vcs, k1, k2, v1, v2, o, m, HALF)


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, sink_slot: torch.Tensor) -> torch.Tensor:
    """See rope_store in __init__; the Triton version (keys and values' last axis contiguous)."""
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("keys and values need a contiguous last axis")
    q, k, v, cos, sin = (batch_rows(x) for x in (q, k, v, cos, sin))
    launch = _rope_store_op if torch.compiler.is_compiling() else _rope_store
    return launch(q, k, v, cos, sin, keys, values, slot, sink_slot)


def _rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, sink_slot: torch.Tensor) -> torch.Tensor:
    B, H, D = q.shape
    HKV = k.shape[1]
    q_out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    _rope_store_kernel[(B, H + HKV)](
        q, k, v, cos, sin, keys, values, slot, sink_slot, q_out,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), sin.stride(0), *keys.stride()[:3], *values.stride()[:3],
        H=H, HALF=D // 2, BH=triton.next_power_of_2(D // 2), num_warps=1,
    )
    return q_out


# torch.compile keeps the launch as this opaque op, its writes to the slots declared, instead of tracing the Triton
# launch and the torch.empty output it fills; eager calls skip its ~15 us dispatch.
_rope_store_op = torch.library.custom_op("hybridize::rope_store", _rope_store, mutates_args=("keys", "values"))


@_rope_store_op.register_fake
def _(q, k, v, cos, sin, keys, values, slot, sink_slot):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
