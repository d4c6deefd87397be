"""A Mamba2 layer's decode step between its projections in one Triton launch: the short conv + SiLU of x, B and C
(its window updated in place), dt = softplus(dt_raw + dt_bias) and the log decay -exp(A_log) dt, the SSD step on the
fp32 state with v = x dt (updated in place), the D skip and the gated RMSNorm of the output.

As for the Gated DeltaNet layer step (kernels/gated_delta/layer_step.py): unfused, the conv step, the SSD step and
the norm are launches of their own, with the dt arithmetic and the D skip as element-wise kernels between them, each
moving a few kilobytes. One program per (batch row, B/C
group) owns that group's B and C channels and the x channels of its heads, so no two programs touch the same conv
window; conv outputs and the output stay in fp32 between the stages.
"""

import torch
import triton
import triton.language as tl

from hybridize.kernels.conv1d.recurrent import conv_step_channels
from hybridize.kernels.gated_delta.inputs import softplus
from hybridize.kernels.layout import batch_rows, check_layer_step_buffers


@triton.jit
def _layer_step_kernel(
    xbc, dt, z, conv_w, conv_b, window, state, o, A_log, dt_bias, D, norm_w, scale, norm_eps,
    s_xb, s_db, s_zb, s_wb, s_wc, s_ww,
    H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, P: tl.constexpr, W: tl.constexpr,
    BN: tl.constexpr, BP: tl.constexpr, BW: tl.constexpr,
):
    i_g, i_b = tl.program_id(0), tl.program_id(1)
    o_n, o_p = tl.arange(0, BN), tl.arange(0, BP)
    m_n, m_p = o_n < N, o_p < P
    x_row = xbc + i_b * s_xb
    w_row = window + i_b * s_wb
    # channels: x [H*P], then B [G*N], then C [G*N]
    c_b, c_c = H * P + i_g * N + o_n, H * P + G * N + i_g * N + o_n
    b_k = conv_step_channels(x_row, conv_w, conv_b, w_row + c_b[:, None] * s_wc, s_ww, c_b, m_n, W, BW, True, True)
    b_q = conv_step_channels(x_row, conv_w, conv_b, w_row + c_c[:, None] * s_wc, s_ww, c_c, m_n, W, BW, True, True)
    for i_r in range(H // G):
        i_h = i_g * (H // G) + i_r
        c_x = i_h * P + o_p
        b_x = conv_step_channels(x_row, conv_w, conv_b, w_row + c_x[:, None] * s_wc, s_ww, c_x, m_p, W, BW, True,
                                 True)  # [BP]
        b_dt = softplus(tl.load(dt + i_b * s_db + i_h).to(tl.float32) + tl.load(dt_bias + i_h).to(tl.float32))
        b_a = tl.exp(-tl.exp(tl.load(A_log + i_h).to(tl.float32)) * b_dt)
        # S = a S + B (x dt)^T ;  y = scale S^T C + D x
        p_s = state + (i_b * H + i_h).to(tl.int64) * N * P + o_n[:, None] * P + o_p[None, :]
        m_s = m_n[:, None] & m_p[None, :]
        b_s = tl.load(p_s, mask=m_s, other=0.0) * b_a + b_k[:, None] * (b_x * b_dt)[None, :]  # [BN, BP]
        tl.store(p_s, b_s, mask=m_s)
        b_y = tl.sum(b_s * b_q[:, None], 0) * scale + tl.load(D + i_h).to(tl.float32) * b_x  # [BP]
        # gated RMSNorm over the head's P values (the masked lanes are 0)
        b_y *= tl.rsqrt(tl.sum(b_y * b_y) / P + norm_eps)
        b_z = tl.load(z + i_b * s_zb + i_h * P + o_p, mask=m_p, other=0.0).to(tl.float32)
        b_y *= tl.load(norm_w + o_p, mask=m_p, other=0.0).to(tl.float32) * b_z * tl.sigmoid(b_z)
        tl.store(o + i_b * H * P + i_h * P + o_p, b_y.to(o.dtype.element_ty), mask=m_p)


def ssd_layer_step(
    xbc: torch.Tensor,
    dt: torch.Tensor,
    z: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor,
    conv_state: torch.Tensor,
    state: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    D: torch.Tensor,
    norm_weight: torch.Tensor,
    *,
    groups: int,
    scale: float | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """One decode token of a Mamba2 layer from its raw projections (no autograd).

    Args:
        xbc: [B, H P + 2 G N] the conv's input (x | B | C); dt: [B, H] raw; z: [B, H P] the output gate's input.
            Any batch stride (rows of the step's joined projection).
        conv_weight: [H P + 2 G N, W]; conv_bias: [H P + 2 G N]; conv_state: [B, H P + 2 G N, W-1] the last W-1
            inputs, oldest first, shifted left with xbc appended, in place.
        state: [B, H, N, P] fp32, contiguous; updated in place.
        A_log, dt_bias, D: [H] each; norm_weight: [P].
        groups: G, a divisor of H; scale: default N ** -0.5; norm_eps: the output RMSNorm's.
    Returns:
        o: [B, H P] in xbc's dtype: RMSNorm(scale S^T C + D x) * norm_weight * silu(z) per head.
    """
    B, H, N, P = state.shape
    channels = H * P + 2 * groups * N
    if xbc.shape != (B, channels) or dt.shape != (B, H) or z.shape != (B, H * P) or H % groups \
            or conv_weight.shape[0] != channels or conv_bias.shape != (channels,) or norm_weight.shape != (P,) \
            or any(p.shape != (H,) for p in (A_log, dt_bias, D)):
        raise ValueError(f"shapes xbc {tuple(xbc.shape)} dt {tuple(dt.shape)} z {tuple(z.shape)} conv_weight "
                         f"{tuple(conv_weight.shape)} norm_weight {tuple(norm_weight.shape)} do not fit state "
                         f"[B, H, N, P] = {(B, H, N, P)}, G {groups}")
    check_layer_step_buffers(conv_state, state, channels, conv_weight.shape[1])
    scale = N**-0.5 if scale is None else scale
    launch = _layer_step_op if torch.compiler.is_compiling() else _layer_step
    return launch(batch_rows(xbc), batch_rows(dt), batch_rows(z), conv_weight.contiguous(), conv_bias.contiguous(),
                  conv_state, state, A_log.contiguous(), dt_bias.contiguous(), D.contiguous(),
                  norm_weight.contiguous(), groups, scale, norm_eps)


def _layer_step(
    xbc: torch.Tensor, dt: torch.Tensor, z: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor,
    conv_state: torch.Tensor, state: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, D: torch.Tensor,
    norm_weight: torch.Tensor, groups: int, scale: float, norm_eps: float,
) -> torch.Tensor:
    B, H, N, P = state.shape
    W = conv_weight.shape[1]
    o = torch.empty(B, H * P, dtype=xbc.dtype, device=xbc.device)
    BN, BP = triton.next_power_of_2(N), triton.next_power_of_2(P)
    _layer_step_kernel[(groups, B)](
        xbc, dt, z, conv_weight, conv_bias, conv_state, state, o, A_log, dt_bias, D, norm_weight, scale, norm_eps,
        xbc.stride(0), dt.stride(0), z.stride(0), *conv_state.stride(),
        H=H, G=groups, N=N, P=P, W=W, BN=BN, BP=BP, BW=triton.next_power_of_2(W),
        num_warps=4 if BN * BP <= 64 * 64 else 8,  # the [N, P] state tile lives in registers
    )
    return o


# torch.compile keeps the launch as this opaque op, its in-place writes declared (see recurrent.py).
_layer_step_op = torch.library.custom_op("hybridize::ssd_layer_step", _layer_step, mutates_args=("conv_state", "state"))


@_layer_step_op.register_fake
def _(xbc, dt, z, conv_weight, conv_bias, conv_state, state, A_log, dt_bias, D, norm_weight, groups, scale, norm_eps):
    B, H, _, P = state.shape
    return xbc.new_empty(B, H * P)
