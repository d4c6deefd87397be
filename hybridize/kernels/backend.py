"""Choose between the Triton kernels and the fp32 PyTorch references."""

import os

import torch

BACKENDS = ("auto", "triton", "reference")


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Return "triton" or "reference" for a call on tensor `x`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda else "reference"
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
    return backend
