"""Triton Mamba2 SSD decode step: one token per sequence, the fp32 state updated in place."""

from typing import Optional

import torch
import triton
import triton.language as tl

from hybridize.kernels.layout import batch_rows


@triton.jit
def ssd_step_kernel(
    q, k, v, g, state, o, scale, stride_qb, stride_kb, stride_vb, stride_gb,
    H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // (H // G)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < N, o_v < P
    m_s = m_k[:, None] & m_v[None, :]

    # Inputs may be rows of wider tensors (views of the step's projections): each has its own batch stride.
    b_q = tl.load(q + i_b * stride_qb + i_g * N + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
    b_k = tl.load(k + i_b * stride_kb + i_g * N + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
    b_v = tl.load(v + i_b * stride_vb + i_h * P + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BV]
    b_a = tl.exp(tl.load(g + i_b * stride_gb + i_h).to(tl.float32))
    p_s = state + i_bh.to(tl.int64) * N * P + o_k[:, None] * P + o_v[None, :]
    b_s = tl.load(p_s, mask=m_s, other=0.0) * b_a + b_k[:, None] * b_v[None, :]  # [BK, BV]
    tl.store(p_s, b_s, mask=m_s)
    b_o = tl.sum(b_s * b_q[:, None], axis=0) * scale  # [BV]
    tl.store(o + i_bh * P + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


def ssd_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """One decode token: state <- exp(g) state + k v^T (in place), o = scale * state^T q.

    Args:
        q, k: [B, G, N]; v: [B, H, P]; g: [B, H], any batch stride (each is copied only if its other axes are not
            contiguous); state: [B, H, N, P] fp32 contiguous, updated in place.
    Returns:
        o [B, H, P] in v's dtype.
    """
    B, G, N = q.shape
    H, P = v.shape[1], v.shape[2]
    if k.shape != q.shape or v.shape[0] != B or g.shape != (B, H) or H % G != 0:
        shapes = ", ".join(f"{n} {tuple(x.shape)}" for n, x in zip("qkvg", (q, k, v, g)))
        raise ValueError(f"shapes {shapes} do not fit")
    if state.shape != (B, H, N, P) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous fp32 [{B}, {H}, {N}, {P}] tensor")
    scale = N**-0.5 if scale is None else scale
    launch = _ssd_step_op if torch.compiler.is_compiling() else _ssd_step
    return launch(*(batch_rows(x) for x in (q, k, v, g)), state, scale)


def _ssd_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor, scale: float
) -> torch.Tensor:
    B, G, N = q.shape
    H, P = v.shape[1], v.shape[2]
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    # The whole N in one block; BV keeps the fp32 tile at <= 4096 elements (32 registers a thread at 4 warps).
    BK = max(triton.next_power_of_2(N), 16)
    BV = min(max(triton.next_power_of_2(P), 16), max(4096 // BK, 16))
    grid = (triton.cdiv(P, BV), B * H)
    ssd_step_kernel[grid](q, k, v, g, state, o, scale, *(x.stride(0) for x in (q, k, v, g)), H=H, G=G, N=N, P=P,
                          BK=BK, BV=BV, num_warps=4)
    return o


# torch.compile keeps the launch as this opaque op, its in-place write declared, instead of tracing the Triton
# launch and the torch.empty output it fills (which AOT autograd can reject); eager calls skip its ~15 us dispatch.
_ssd_step_op = torch.library.custom_op("hybridize::ssd_step", _ssd_step, mutates_args=("state",))


@_ssd_step_op.register_fake
def _(q, k, v, g, state, scale):
    return v.new_empty(v.shape)
