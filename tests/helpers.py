"""Test utilities shared by every test module (imported as `helpers`; pytest puts tests/ on sys.path)."""

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_rmse(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Root-mean-square error of `actual`, relative to the RMS of `expected` (both taken in fp64)."""
    a, e = actual.double(), expected.double()
    return ((a - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_rel_rmse(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: NaN/inf (unwritten or overflowed output)"
    err = rel_rmse(actual, expected)
    assert err <= tol, f"{name}: relative RMSE {err:.2e} > {tol:.0e}"
