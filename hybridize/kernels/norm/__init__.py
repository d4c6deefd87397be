"""Gated RMSNorm: y = RMSNorm(x) * weight * silu(gate), the output norm of the Gated DeltaNet and Mamba2 layers.

`backend="auto"` runs Triton on CUDA tensors and the fp32 PyTorch reference otherwise; see kernels/backend.py.
"""

import torch

from ..backend import resolve_backend
from . import chunk, reference


def gated_rms_norm(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor,
    *,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """y = x * rsqrt(mean(x^2, -1) + eps) * weight * silu(gate) for x, gate: [..., D], weight: [D].

    gate=None gives a plain RMSNorm. Computed in fp32; returned in x's dtype.
    """
    fn = chunk.gated_rms_norm if resolve_backend(backend, x) == "triton" else reference.gated_rms_norm
    return fn(x, gate, weight, eps=eps)


__all__ = ["gated_rms_norm"]
