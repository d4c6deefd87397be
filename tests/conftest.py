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


def interpreted_cuda_test(item: pytest.Item) -> bool:
    """Whether `item` is a CUDA test (helpers.requires_cuda) about to run on a GPU with TRITON_INTERPRET=1."""
    from helpers import CUDA_TEST

    cuda_test = any(mark.kwargs.get("reason") == CUDA_TEST for mark in item.iter_markers("skipif"))
    return cuda_test and os.environ.get("TRITON_INTERPRET") == "1" and torch.cuda.is_available()


@pytest.hookimpl(trylast=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A CUDA test checks the compiled kernels. Under the interpreter (this file's default) the kernels would run in
    the CPU's emulation instead, whose bf16 matmul is wrong: bf16 cases would fail and the others pass without the
    compiled code having run. So such a test stops with the way to run it."""
    if interpreted_cuda_test(item):
        pytest.fail("CUDA tests run the compiled kernels: set TRITON_INTERPRET=0 (e.g. TRITON_INTERPRET=0 pytest -k "
                    "cuda, or bash scripts/gpu/kernels.sh)", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def interpreter_loops_over_runtime_bounds():
    """Triton 3.6's interpreter holds scalars as 1-element numpy arrays and turns them into ints with int(),
    which numpy 2.4 refuses, so `for i_t in range(NT)` over a runtime NT (the SSD kernels' chunk loops) fails.
    Index the element instead. Every test that runs a model on the interpreted kernels needs it, not only the
    kernel tests; it changes nothing on a GPU."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter, "_patch_lang_tensor", patched)
        yield


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M teacher and tokenizer, loaded once per test session (fp32, CPU)."""
    from hybridize.teacher import load_teacher

    return load_teacher()
