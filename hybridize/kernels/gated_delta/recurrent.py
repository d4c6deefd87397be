"""Gated delta rule decode step in Triton: one token per sequence, the fp32 state updated in place."""

import torch
import triton
import triton.language as tl

from hybridize.kernels.gated_delta.inputs import decay_gate
from hybridize.kernels.gated_delta.reference import L2NORM_EPS, GateParams, check_gate_params
from hybridize.kernels.layout import batch_rows


@triton.jit
def _step_kernel(
    q, k, v, g, beta, state, o, scale, A_log, dt_bias, b_bias, eps,
    stride_qb, stride_kb, stride_vb, stride_gb, stride_bb,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    RAW_GATES: tl.constexpr, QK_L2NORM: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // (H // HK)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_s = m_k[:, None] & m_v[None, :]

    # Inputs may be rows of wider tensors (views of the step's projections): each has its own batch stride.
    b_q = tl.load(q + i_b * stride_qb + i_hk * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + i_b * stride_kb + i_hk * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + i_b * stride_vb + i_h * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_g = tl.load(g + i_b * stride_gb + i_h).to(tl.float32)
    b_b = tl.load(beta + i_b * stride_bb + i_h).to(tl.float32)
    if QK_L2NORM:
        b_q *= tl.rsqrt(tl.sum(b_q * b_q) + eps)
        b_k *= tl.rsqrt(tl.sum(b_k * b_k) + eps)
    if RAW_GATES:  # g, beta hold the raw a, b
        b_g, _ = decay_gate(b_g, tl.load(A_log + i_h).to(tl.float32), tl.load(dt_bias + i_h).to(tl.float32))
        b_b = tl.sigmoid(b_b + tl.load(b_bias + i_h).to(tl.float32))
    p_s = state + i_bh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    b_s = tl.load(p_s, mask=m_s, other=0.0) * tl.exp(b_g)  # [BK, BV]
    # S = a S + k (b (v - (a S)^T k))^T ;  o = scale S^T q
    b_d = b_b * (b_v - tl.sum(b_s * b_k[:, None], 0))  # [BV]
    b_s += b_k[:, None] * b_d[None, :]
    tl.store(p_s, b_s, mask=m_s)
    b_o = tl.sum(b_s * b_q[:, None], 0) * scale
    tl.store(o + i_bh * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


def gated_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float | None = None,
    gate_params: GateParams | None = None,
    qk_l2norm: bool = False,
) -> torch.Tensor:
    """One decode token of the gated delta rule (no autograd).

    Args:
        q, k: [B, HK, K]; v: [B, H, V], H a multiple of HK; g (log decay), beta: [B, H]. Any batch stride: each
            is copied only if its other axes are not contiguous.
        state: [B, H, K, V] fp32, contiguous; updated in place.
        scale: output scale, default K ** -0.5.
        gate_params: GateParams(A_log, dt_bias, b_bias), each [H]: g and beta are then the raw a and b, and the
            kernel forms g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b + b_bias) (fp32).
        qk_l2norm: q and k are raw; the kernel normalizes them (fp32, 1e-6 inside the rsqrt).
    Returns:
        o: [B, H, V] in v's dtype.
    """
    B, HK, K = q.shape
    H, V = v.shape[1], v.shape[2]
    if k.shape != q.shape or v.shape[0] != B or H % HK or g.shape != (B, H) or beta.shape != (B, H):
        raise ValueError(f"shapes q {q.shape} k {k.shape} v {v.shape} g {g.shape} beta {beta.shape} do not fit")
    if state.shape != (B, H, K, V) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous fp32 [B, H, K, V] = {(B, H, K, V)} tensor")
    check_gate_params(gate_params, H)
    scale = K**-0.5 if scale is None else scale
    q, k, v, g, beta = (batch_rows(x) for x in (q, k, v, g, beta))
    params = (None, None, None) if gate_params is None else tuple(p.contiguous() for p in gate_params)
    launch = _gated_delta_step_op if torch.compiler.is_compiling() else _gated_delta_step
    return launch(q, k, v, g, beta, state, scale, *params, qk_l2norm)


def _gated_delta_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
    scale: float, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None, b_bias: torch.Tensor | None,
    qk_l2norm: bool,
) -> torch.Tensor:
    B, HK, K = q.shape
    H, V = v.shape[1], v.shape[2]
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    BK = triton.next_power_of_2(K)
    # The state is read and written once: many small programs keep enough bytes in flight.
    BV = min(triton.next_power_of_2(V), max(4, 4096 // BK))
    _step_kernel[(triton.cdiv(V, BV), B * H)](
        q, k, v, g, beta, state, o, scale, A_log, dt_bias, b_bias, L2NORM_EPS,
        *(x.stride(0) for x in (q, k, v, g, beta)),
        H=H, HK=HK, K=K, V=V, BK=BK, BV=BV, RAW_GATES=A_log is not None, QK_L2NORM=qk_l2norm, num_warps=4,
    )
    return o


# torch.compile keeps the launch as this opaque op, its in-place write declared, instead of tracing the Triton
# launch and the torch.empty output it fills (which AOT autograd can reject); eager calls skip its ~15 us dispatch.
_gated_delta_step_op = torch.library.custom_op(
    "hybridize::gated_delta_step", _gated_delta_step, mutates_args=("state",)
)


@_gated_delta_step_op.register_fake
def _(q, k, v, g, beta, state, scale, A_log, dt_bias, b_bias, qk_l2norm):
    return torch.empty(v.shape, dtype=v.dtype, device=v.device)
