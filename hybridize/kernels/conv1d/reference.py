"""Causal depthwise short convolution in plain PyTorch: the fp32 ground truth for the Triton kernels."""

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "silu")
MAX_WIDTH = 4


def check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_conv_args(x, weight, activation, initial_state, cu_seqlens) -> None:
    """Shape and option checks shared by the reference and the Triton version."""
    check_activation(activation)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[-1] or not 1 <= weight.shape[1] <= MAX_WIDTH:
        raise ValueError(f"weight must be [D={x.shape[-1]}, W<={MAX_WIDTH}], got {tuple(weight.shape)}")
    if cu_seqlens is not None and x.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1, got {x.shape[0]}")
    D, W = weight.shape
    N = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, D, W - 1):
        raise ValueError(f"initial_state must be [N={N}, D={D}, W-1={W - 1}], got {tuple(initial_state.shape)}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 inputs stay fp64 (for gradient checks); everything else is computed in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _conv_one(x, weight, bias, activation, h0):
    """One sequence. x: [T, D] and h0: [D, W-1] in the compute dtype; returns y [T, D] and the padded input."""
    T, W = x.shape[0], weight.shape[1]
    xp = torch.cat([h0.t(), x], dim=0)  # [W-1+T, D], the inputs seen by step t are xp[t : t+W]
    y = sum(weight[:, i] * xp[i:i + T] for i in range(W))  # [T, D]
    if bias is not None:
        y = y + bias
    if activation == "silu":
        y = F.silu(y)
    return y, xp


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y_t = act(bias + sum_i weight[:, i] * x_{t-W+1+i}); see causal_conv1d in __init__ for the shapes."""
    check_conv_args(x, weight, activation, initial_state, cu_seqlens)
    B, T, D = x.shape
    W = weight.shape[1]
    dt = compute_dtype(x)
    starts = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    # Without cu_seqlens the B rows are the sequences; with it the one row holds N packed sequences.
    rows = [(b, 0, T) for b in range(B)] if cu_seqlens is None else [(0, s, e) for s, e in zip(starts[:-1], starts[1:])]
    w, b = weight.to(dt), None if bias is None else bias.to(dt)
    ys, finals = [], []
    for n, (i_b, bos, eos) in enumerate(rows):
        h0 = x.new_zeros(D, W - 1, dtype=dt) if initial_state is None else initial_state[n].to(dt)
        y, xp = _conv_one(x[i_b, bos:eos].to(dt), w, b, activation, h0)
        ys.append(y)
        finals.append(xp[xp.shape[0] - (W - 1):].t())  # [D, W-1], oldest first
    y = torch.cat(ys, 0).view(1, -1, D) if cu_seqlens is not None else torch.stack(ys, 0)
    final_state = torch.stack(finals, 0).to(x.dtype) if output_final_state else None
    return y.to(x.dtype), final_state


def causal_conv1d_step(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    conv_state: torch.Tensor,
    activation: str | None = None,
) -> torch.Tensor:
    """One decode step; x: [B, D], conv_state: [B, D, W-1] is shifted left and gets x appended, in place."""
    check_activation(activation)
    dt = compute_dtype(x)
    window = torch.cat([conv_state.to(dt), x.to(dt).unsqueeze(-1)], dim=-1)  # [B, D, W]
    y = (window * weight.to(dt)).sum(-1)  # [B, D]
    if bias is not None:
        y = y + bias.to(dt)
    if activation == "silu":
        y = F.silu(y)
    conv_state.copy_(window[..., 1:])
    return y.to(x.dtype)
