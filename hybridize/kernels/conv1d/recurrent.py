"""Single-token decode step of the causal depthwise convolution in Triton, updating the rolling state in place."""

from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import check_activation


@triton.jit
def conv_step_channels(x_row, w, b, p_window, s_sw, o_c, m_c, W: tl.constexpr, BW: tl.constexpr,
                       HAS_BIAS: tl.constexpr, USE_SILU: tl.constexpr):
    """y [BC] fp32 of channels o_c (mask m_c) for the new input at x_row + o_c: the conv over the W-1 inputs stored
    at p_window [BC, 1] (oldest first, step s_sw) and the new one, plus bias, then SiLU; the stored window is then
    shifted left with the new input appended, in place. Also the decode step of fused layer kernels."""
    o_w = tl.arange(0, BW)
    m_old = m_c[:, None] & (o_w < W - 1)[None, :]
    b_x = tl.load(x_row + o_c, mask=m_c, other=0.)  # [BC]
    # the window is the W-1 stored inputs followed by the new one
    b_win = tl.load(p_window + o_w[None, :] * s_sw, mask=m_old, other=0.).to(tl.float32)
    b_win = tl.where((o_w == W - 1)[None, :], b_x[:, None].to(tl.float32), b_win)  # [BC, BW]
    # the new window is the window without its oldest column
    b_new = tl.load(p_window + (o_w + 1)[None, :] * s_sw, mask=m_c[:, None] & (o_w < W - 2)[None, :], other=0.)
    b_new = tl.where((o_w == W - 2)[None, :], b_x[:, None].to(b_new.dtype), b_new)  # [BC, BW]
    b_w = tl.load(w + o_c[:, None] * W + o_w[None, :], mask=m_c[:, None] & (o_w < W)[None, :], other=0.)
    b_y = tl.sum(b_win * b_w.to(tl.float32), 1)  # [BC]
    if HAS_BIAS:
        b_y += tl.load(b + o_c, mask=m_c, other=0.).to(tl.float32)
    if USE_SILU:
        b_y = b_y * tl.sigmoid(b_y)
    # other threads of this program read cells that these stores overwrite: all reads must land first
    tl.debug_barrier()
    tl.store(p_window + o_w[None, :] * s_sw, b_new, mask=m_old)
    return b_y


@triton.jit
def causal_conv1d_step_kernel(
    x, w, b, state, y, s_sb, s_sd, s_sw, D,
    W: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr, HAS_BIAS: tl.constexpr, USE_SILU: tl.constexpr,
):
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    p_window = state + i_b * s_sb + o_d[:, None] * s_sd
    b_y = conv_step_channels(x + i_b * D, w, b, p_window, s_sw, o_d, m_d, W, BW, HAS_BIAS, USE_SILU)
    tl.store(y + i_b * D + o_d, b_y.to(y.dtype.element_ty), mask=m_d)


def causal_conv1d_step(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    conv_state: torch.Tensor,
    activation: str | None = None,
) -> torch.Tensor:
    """One decode step of causal_conv1d.

    Args:
        x: [B, D] the new input.
        weight: [D, W]; bias: [D] or None; activation: None or "silu".
        conv_state: [B, D, W-1] the last W-1 inputs, oldest first; shifted left with x appended, in place.
    Returns:
        y: [B, D] in x's dtype.
    """
    check_activation(activation)
    B, D = x.shape
    W = weight.shape[1]
    if tuple(conv_state.shape) != (B, D, W - 1):
        raise ValueError(f"conv_state must be [B={B}, D={D}, W-1={W - 1}], got {tuple(conv_state.shape)}")
    launch = _conv1d_step_op if torch.compiler.is_compiling() else _conv1d_step
    return launch(x.contiguous(), weight.contiguous(), bias, conv_state, activation == "silu")


def _conv1d_step(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], conv_state: torch.Tensor, use_silu: bool
) -> torch.Tensor:
    B, D = x.shape
    W = weight.shape[1]
    y = torch.empty_like(x)
    BD = min(128, triton.next_power_of_2(D))
    causal_conv1d_step_kernel[(triton.cdiv(D, BD), B)](
        x, weight, bias, conv_state, y, *conv_state.stride(), D,
        W=W, BD=BD, BW=triton.next_power_of_2(W), HAS_BIAS=bias is not None, USE_SILU=use_silu,
        num_warps=4,
    )
    return y


# torch.compile keeps the launch as this opaque op, its in-place write declared, instead of tracing the Triton
# launch and the torch.empty output it fills (which AOT autograd can reject); eager calls skip its ~15 us dispatch.
_conv1d_step_op = torch.library.custom_op("hybridize::causal_conv1d_step", _conv1d_step, mutates_args=("conv_state",))


@_conv1d_step_op.register_fake
def _(x, weight, bias, conv_state, use_silu):
    return x.new_empty(x.shape)
