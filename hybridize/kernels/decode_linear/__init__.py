"""Linear layers of a decode step: a few rows (one token of each of B sequences) against a wide weight.

At that shape a GEMM reads its weight once and does little else, so its time is the time to stream the weight. cuBLAS
tiles the output only ([N / 64] x [M / 8] blocks: 18 blocks for a 576-wide output), so a few SMs stream the whole
weight and the call takes several times the copy time. The split-K kernel spreads the reduction axis over the SMs as
well and sums the partial tiles in the same launch (split_k.py).

`backend="auto"` runs the kernel on CUDA tensors and the reference (F.linear) otherwise; see kernels/backend.py.
"""

import torch

from ..backend import resolve_backend
from . import reference, split_k

MAX_ROWS = 64  # past this many rows a GEMM has enough output tiles of its own: the reference


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  backend: str = "auto") -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N] in x's dtype, accumulated in fp32 (in tf32 only where
    torch.backends.cuda.matmul.allow_tf32 allows it for an fp32 x). The kernel's rows are x's leading axes flattened;
    above MAX_ROWS of them, or on the reference backend, it is F.linear."""
    rows = x.numel() // x.shape[-1]
    if resolve_backend(backend, x) == "reference" or rows > MAX_ROWS:
        return reference.decode_linear(x, weight, bias)
    return split_k.linear(x, weight, bias)


__all__ = ["decode_linear", "MAX_ROWS"]
