"""The plain-PyTorch decode linear: F.linear, what the Triton kernel computes."""

import torch
import torch.nn.functional as F


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N]."""
    return F.linear(x, weight, bias)
