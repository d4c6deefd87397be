"""Choose between the Triton kernels and the fp32 PyTorch references.

`HYBRIDIZE_KERNELS=reference` makes every "auto" call take the reference path, CUDA tensors included: the same model,
eval or training run on the plain PyTorch math, to tell a kernel defect from a modelling one. `HYBRIDIZE_KERNELS=triton`
makes every "auto" call take the Triton kernels, CPU tensors included (which needs TRITON_INTERPRET=1: the Triton
interpreter runs them), so a whole model's use of the kernels can be checked on a machine without a GPU.
"""

import os

import torch

from ..errors import UserError

BACKENDS = ("auto", "triton", "reference")
ENVIRONMENT_VARIABLE = "HYBRIDIZE_KERNELS"


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Return "triton" or "reference" for a call on tensor `x`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        preferred = _preferred()
        if preferred != "triton":
            return "triton" if preferred == "auto" and x.is_cuda else "reference"
        backend = "triton"
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
    return backend


def _preferred() -> str:
    preferred = os.environ.get(ENVIRONMENT_VARIABLE, "auto")
    if preferred not in ("auto", "reference", "triton"):
        raise UserError(f"{ENVIRONMENT_VARIABLE} must be 'auto', 'reference' or 'triton', got {preferred!r}")
    return preferred


def check_one_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The recurrent ops take q, k, v in one dtype, on both backends: the references would upcast mixed dtypes
    silently where the kernels' matmuls cannot take them."""
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
