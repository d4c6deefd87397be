"""A Gated DeltaNet layer's decode step between its projections in one Triton launch: the short conv + SiLU of q, k
and v (its window updated in place), the L2 norms, the gate and beta from the raw a and b, the gated delta rule on the
fp32 state (updated in place) and the gated RMSNorm of the output.

Unfused, that is three launches (conv step, delta step, norm), each moving a few kilobytes at a decode batch of 16,
where a launch costs more than its work. One program per (batch row, q/k head) does all of it,
keeping the conv outputs and the output in fp32 registers between the stages (the unfused ops round both to the
input dtype). A program owns its q/k head's channels and the value heads that read them, so no two programs touch
the same conv window.
"""

import torch
import triton
import triton.language as tl

from hybridize.kernels.conv1d.recurrent import conv_step_channels
from hybridize.kernels.gated_delta.inputs import decay_gate
from hybridize.kernels.gated_delta.reference import L2NORM_EPS, GateParams, check_gate_params
from hybridize.kernels.layout import batch_rows, check_layer_step_buffers


@triton.jit
def _layer_step_kernel(
    qkv, a, b, gate, conv_w, window, state, o, A_log, dt_bias, b_bias, norm_w, scale, l2_eps, norm_eps,
    s_xb, s_ab, s_bb, s_gb, s_wb, s_wc, s_ww,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BW: tl.constexpr,
):
    i_hk, i_b = tl.program_id(0), tl.program_id(1)
    o_k, o_v = tl.arange(0, BK), tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    x_row = qkv + i_b * s_xb
    w_row = window + i_b * s_wb
    # channels: q [HK*K], then k [HK*K], then v [H*V]
    c_q, c_k = i_hk * K + o_k, HK * K + i_hk * K + o_k
    b_q = conv_step_channels(x_row, conv_w, None, w_row + c_q[:, None] * s_wc, s_ww, c_q, m_k, W, BW, False, True)
    b_k = conv_step_channels(x_row, conv_w, None, w_row + c_k[:, None] * s_wc, s_ww, c_k, m_k, W, BW, False, True)
    b_q *= tl.rsqrt(tl.sum(b_q * b_q) + l2_eps)
    b_k *= tl.rsqrt(tl.sum(b_k * b_k) + l2_eps)
    for i_g in range(H // HK):
        i_h = i_hk * (H // HK) + i_g
        c_v = 2 * HK * K + i_h * V + o_v
        b_v = conv_step_channels(x_row, conv_w, None, w_row + c_v[:, None] * s_wc, s_ww, c_v, m_v, W, BW, False,
                                 True)  # [BV]
        b_g, _ = decay_gate(tl.load(a + i_b * s_ab + i_h), tl.load(A_log + i_h).to(tl.float32),
                            tl.load(dt_bias + i_h).to(tl.float32))
        b_beta = tl.sigmoid(tl.load(b + i_b * s_bb + i_h).to(tl.float32) + tl.load(b_bias + i_h).to(tl.float32))
        # S = a S + k (b (v - (a S)^T k))^T ;  o = scale S^T q
        p_s = state + (i_b * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        m_s = m_k[:, None] & m_v[None, :]
        b_s = tl.load(p_s, mask=m_s, other=0.0) * tl.exp(b_g)  # [BK, BV]
        b_d = b_beta * (b_v - tl.sum(b_s * b_k[:, None], 0))  # [BV]
        b_s += b_k[:, None] * b_d[None, :]
        tl.store(p_s, b_s, mask=m_s)
        b_o = tl.sum(b_s * b_q[:, None], 0) * scale  # [BV]
        # gated RMSNorm over the head's V values (the masked lanes are 0)
        b_o *= tl.rsqrt(tl.sum(b_o * b_o) / V + norm_eps)
        b_z = tl.load(gate + i_b * s_gb + i_h * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_o *= tl.load(norm_w + o_v, mask=m_v, other=0.0).to(tl.float32) * b_z * tl.sigmoid(b_z)
        tl.store(o + i_b * H * V + i_h * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


def gated_delta_layer_step(
    qkv: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gate: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    state: torch.Tensor,
    gate_params: GateParams,
    norm_weight: torch.Tensor,
    *,
    k_heads: int,
    scale: float | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """One decode token of a Gated DeltaNet layer from its raw projections (no autograd).

    Args:
        qkv: [B, 2 HK K + H V] the conv's input (q | k | v); a, b: [B, H] raw; gate: [B, H V] the output gate's
            input. Any batch stride (rows of the step's joined projection).
        conv_weight: [2 HK K + H V, W]; conv_state: [B, 2 HK K + H V, W-1] the last W-1 inputs, oldest first,
            shifted left with qkv appended, in place.
        state: [B, H, K, V] fp32, contiguous; updated in place.
        gate_params: GateParams(A_log, dt_bias, b_bias), each [H]; norm_weight: [V].
        k_heads: HK, a divisor of H; scale: default K ** -0.5; norm_eps: the output RMSNorm's.
    Returns:
        o: [B, H V] in qkv's dtype: RMSNorm(S^T q scale) * norm_weight * silu(gate) per head.
    """
    B, H, K, V = state.shape
    channels = 2 * k_heads * K + H * V
    if qkv.shape != (B, channels) or a.shape != (B, H) or b.shape != (B, H) or gate.shape != (B, H * V) \
            or H % k_heads or conv_weight.shape[0] != channels or norm_weight.shape != (V,):
        raise ValueError(f"shapes qkv {tuple(qkv.shape)} a {tuple(a.shape)} b {tuple(b.shape)} gate "
                         f"{tuple(gate.shape)} conv_weight {tuple(conv_weight.shape)} norm_weight "
                         f"{tuple(norm_weight.shape)} do not fit state [B, H, K, V] = {(B, H, K, V)}, HK {k_heads}")
    check_layer_step_buffers(conv_state, state, channels, conv_weight.shape[1])
    check_gate_params(gate_params, H)
    scale = K**-0.5 if scale is None else scale
    launch = _layer_step_op if torch.compiler.is_compiling() else _layer_step
    return launch(batch_rows(qkv), batch_rows(a), batch_rows(b), batch_rows(gate), conv_weight.contiguous(),
                  conv_state, state, *(p.contiguous() for p in gate_params), norm_weight.contiguous(), k_heads,
                  scale, norm_eps)


def _layer_step(
    qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gate: torch.Tensor, conv_weight: torch.Tensor,
    conv_state: torch.Tensor, state: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, b_bias: torch.Tensor,
    norm_weight: torch.Tensor, k_heads: int, scale: float, norm_eps: float,
) -> torch.Tensor:
    B, H, K, V = state.shape
    W = conv_weight.shape[1]
    o = torch.empty(B, H * V, dtype=qkv.dtype, device=qkv.device)
    BK, BV = triton.next_power_of_2(K), triton.next_power_of_2(V)
    _layer_step_kernel[(k_heads, B)](
        qkv, a, b, gate, conv_weight, conv_state, state, o, A_log, dt_bias, b_bias, norm_weight, scale, L2NORM_EPS,
        norm_eps, qkv.stride(0), a.stride(0), b.stride(0), gate.stride(0), *conv_state.stride(),
        H=H, HK=k_heads, K=K, V=V, W=W, BK=BK, BV=BV, BW=triton.next_power_of_2(W),
        num_warps=4 if BK * BV <= 64 * 64 else 8,  # the [K, V] state tile lives in registers
    )
    return o


# torch.compile keeps the launch as this opaque op, its in-place writes declared (see recurrent.py).
_layer_step_op = torch.library.custom_op(
    "hybridize::gated_delta_layer_step", _layer_step, mutates_args=("conv_state", "state")
)


@_layer_step_op.register_fake
def _(qkv, a, b, gate, conv_weight, conv_state, state, A_log, dt_bias, b_bias, norm_weight, k_heads, scale, norm_eps):
    B, H, _, V = state.shape
    return qkv.new_empty(B, H * V)
