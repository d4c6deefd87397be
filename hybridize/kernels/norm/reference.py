"""Gated RMSNorm in plain PyTorch: the fp32 ground truth for the Triton kernels."""

import torch
import torch.nn.functional as F


def check_norm_args(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor) -> None:
    """Shape checks shared by the reference and the Triton version."""
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {tuple(x.shape)}, got {tuple(gate.shape)}")
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight must be [D={x.shape[-1]}], got {tuple(weight.shape)}")


def gated_rms_norm(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor,
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """y = x * rsqrt(mean(x^2) + eps) * weight * silu(gate) over the last dim; see gated_rms_norm in __init__."""
    check_norm_args(x, gate, weight)
    # fp64 inputs stay fp64 (for gradient checks); everything else is computed in fp32
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(dt)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dt)
    if gate is not None:
        y = y * F.silu(gate.to(dt))
    return y.to(x.dtype)
