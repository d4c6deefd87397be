"""Shared test setup: Triton runs interpreted on CPU, and uninitialised memory is poisoned with NaN."""

import os

# Must be set before triton is imported anywhere, so that @triton.jit kernels run on the CPU interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402

_torch_empty = torch.empty
_torch_empty_like = torch.empty_like


def _nan_filled(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        with torch.no_grad():  # torch.compile itself allocates leaves that require grad (Inductor's pattern inputs)
            t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """A kernel that forgets to write part of an output leaves NaN there, which the tests catch."""
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: _nan_filled(_torch_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: _nan_filled(_torch_empty_like(*a, **kw)))


@pytest.hookimpl(trylast=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A CUDA test checks the compiled kernels. Under the interpreter (this file's default) the kernels would run in
    the CPU's emulation instead, and the test would pass or fail without the compiled code having run. So such a test
    stops with the way to run it."""
    from helpers import interpreted_cuda_test

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


@pytest.fixture(scope="session", autouse=True)
def interpreter_bf16_as_on_the_gpu():
    """Triton 3.6's interpreter holds bf16 values as their uint16 bits, multiplies those bits in tl.dot as if they
    were integers (garbage), and truncates fp32 to bf16 where the GPU rounds to nearest. Here tl.dot reads bf16
    operands as the fp32 values they are (exact: their products fit in fp32, and the GPU accumulates in fp32), and
    fp32 -> bf16 rounds to nearest even, so that the CPU tests run bf16 kernels with the GPU's arithmetic."""
    from helpers import bf16_bits_to_fp32, fp32_to_bf16_bits
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    dot, cast = builder.create_dot, builder.cast_impl

    def as_fp32(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        return interpreter.TensorHandle(bf16_bits_to_fp32(x.data), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, as_fp32(a), as_fp32(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(fp32_to_bf16_bits(src.data), tl.bfloat16)
        return cast(self, src, dst_type)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builder, "create_dot", create_dot)
        mp.setattr(builder, "cast_impl", cast_impl)
        yield


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M teacher and tokenizer, loaded once per test session (fp32, CPU)."""
    from hybridize.teacher import load_teacher

    return load_teacher()
