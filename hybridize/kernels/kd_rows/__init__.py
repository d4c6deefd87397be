"""Distillation terms per row of two logit matrices: the divergence, the student's CE, and their logit gradient.

`backend="auto"` runs the Triton kernel on CUDA tensors, and the PyTorch reference otherwise (CPU tensors, fp64
logits); see kernels/backend.py.
"""

import torch

from ..backend import resolve_backend
from . import online, reference
from .reference import DIVERGENCES


def kd_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
            temperature: float = 1.0, divergence: str = "forward_kl", jsd_beta: float = 0.5,
            grad_scale: torch.Tensor | None = None, ce_grad_scale: torch.Tensor | None = None,
            backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per row of logits [n, V] (rows contiguous), with p = softmax(teacher / T) and q = softmax(student / T):

        divergence [n]  D(p, q) at the temperature T (README.md),
        ce [n]          -log softmax(student)[label] at temperature 1; 0 where the label is negative (no label),
        grad [n, V]     grad_scale * dD/d(student / T) + ce_grad_scale * d ce/d student, rows without a label
                        getting no CE term; None without grad_scale. In the logits' dtype.

    grad_scale and ce_grad_scale are [n] fp32 (None: no gradient, no CE gradient). Softmaxes and sums run in fp32
    (fp64 for fp64 logits). student_logits is consumed: when a gradient is asked for, its memory may hold it.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    chosen = resolve_backend(backend, student_logits)
    if chosen == "triton" and student_logits.dtype == torch.float64:
        if backend == "triton":
            raise ValueError("the Triton kd_rows kernel takes fp32, fp16 and bf16 logits")
        chosen = "reference"
    if chosen == "triton":
        return online.kd_rows(student_logits, teacher_logits, labels, temperature=temperature, divergence=divergence,
                              jsd_beta=jsd_beta, grad_scale=grad_scale, ce_grad_scale=ce_grad_scale)
    return reference.kd_rows(student_logits, teacher_logits, labels, temperature=temperature, divergence=divergence,
                             jsd_beta=jsd_beta, grad_scale=grad_scale, ce_grad_scale=ce_grad_scale)


__all__ = ["DIVERGENCES", "kd_rows"]
