"""Test utilities shared by every test module (imported as `helpers`; pytest puts tests/ on sys.path)."""

import pytest
import torch

from hybridize.model.configuration_hybrid import BRANCH_TYPES, HEADWISE_TYPES

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


# The intra-layer types: an attention branch and a recurrent branch summed in one mixer (window + memory, head-wise).
# Read from the config's table, so a type added there is tested wherever these are.
INTRA_LAYER_TYPES = list(BRANCH_TYPES)


def intra_layer_options(layer_types: list[str], windowed: bool, kv_heads: int) -> dict:
    """HybridConfig options for the intra-layer layers of `layer_types`. windowed=False: memories over every token,
    head-wise attention heads over the whole sequence (keeping the default first KV head); True: memories over the
    tokens that have left the window, head-wise attention heads in the window with its sinks, keeping the last of
    the `kv_heads` KV heads instead."""
    kept = {str(i): [kv_heads - 1] for i, kind in enumerate(layer_types) if kind in HEADWISE_TYPES}
    return dict(memory_outside_window=windowed, headwise_window=windowed, headwise_kv_heads=kept if windowed else None)


@torch.no_grad()
def open_memory_branches(model, seed: int = 0) -> None:
    """Random memory_scale [C] in every intra-layer layer. Conversion starts it at zero, which hides the memory
    branch and all its gradients; a config starts it at one, which hides what the scale does per channel."""
    generator = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        if layer.layer_type in BRANCH_TYPES:
            scale = layer.mixer.memory_scale
            scale.copy_(torch.randn(scale.shape, generator=generator))
