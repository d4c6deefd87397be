"""Causal depthwise short convolution (width <= 4) with optional SiLU: full sequence and single decode step.

`backend="auto"` runs Triton on CUDA tensors and the fp32 PyTorch reference otherwise; see kernels/backend.py.
"""

import torch

from ..backend import resolve_backend
from . import chunk, recurrent, reference


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y_t = act(bias + sum_i weight[:, i] * x_{t-W+1+i}) for x: [B, T, D], weight: [D, W], W <= 4.

    initial_state / final_state: [N, D, W-1], the last W-1 inputs oldest first, in x's dtype (N = B, or the
    number of packed sequences with cu_seqlens). Returns (y [B, T, D], final_state or None).
    """
    fn = chunk.causal_conv1d if resolve_backend(backend, x) == "triton" else reference.causal_conv1d
    return fn(x, weight, bias, activation=activation, initial_state=initial_state,
              output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def causal_conv1d_step(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    conv_state: torch.Tensor,
    activation: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode step: x [B, D] -> y [B, D]; conv_state [B, D, W-1] is shifted left with x appended, in place."""
    fn = recurrent.causal_conv1d_step if resolve_backend(backend, x) == "triton" else reference.causal_conv1d_step
    return fn(x, weight, bias, conv_state=conv_state, activation=activation)


__all__ = ["causal_conv1d", "causal_conv1d_step"]
