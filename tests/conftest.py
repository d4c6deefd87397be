"""Shared test setup: Triton runs interpreted on CPU, and uninitialised memory is poisoned with NaN."""

import os

# Must be set before triton is imported anywhere, so that @triton.jit kernels run on the CPU interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_torch_empty = torch.empty
_torch_empty_like = torch.empty_like


def _nan_filled(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """A kernel that forgets to write part of an output leaves NaN there, which the tests catch."""
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: _nan_filled(_torch_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: _nan_filled(_torch_empty_like(*a, **kw)))



@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M teacher and tokenizer, loaded once per test session (fp32, CPU)."""
    from hybridize.teacher import load_teacher

    return load_teacher()
