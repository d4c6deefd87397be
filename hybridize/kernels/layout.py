"""Memory layouts the decode-step kernels accept without a copy."""

import torch


def batch_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, ...] with every axis after the batch one contiguous, copied only if it is not already: the kernels take
    the batch stride as it is, so rows of a wider tensor (a view of the step's projections) go in as they are."""
    return x if x[0].is_contiguous() else x.contiguous()
