"""The test setup itself: a CUDA test never runs the interpreted kernels, and the interpreter's bf16 is the GPU's."""

from pathlib import Path

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from helpers import bf16_bits_to_fp32, fp32_to_bf16_bits, interpreted_cuda_test, requires_cuda


def root_conftest(config: pytest.Config):
    """tests/conftest.py as pytest loaded it (several conftest.py files share the module name)."""
    here = Path(__file__).with_name("conftest.py")
    return next(p for p in config.pluginmanager.get_plugins() if getattr(p, "__file__", None) == str(here))


def test_a_cuda_test_under_the_interpreter_stops_with_the_fix(request, monkeypatch):
    setup = root_conftest(request.config).pytest_runtest_setup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    item = request.node
    assert not interpreted_cuda_test(item)  # this test is not a CUDA test
    item.add_marker(requires_cuda)
    assert interpreted_cuda_test(item)
    with pytest.raises(pytest.fail.Exception, match="set TRITON_INTERPRET=0"):
        setup(item)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreted_cuda_test(item)
    setup(item)  # compiled kernels: the test runs


def test_bf16_conversions_match_torch():
    """fp32 -> bf16 rounds to nearest even as torch (and the GPU) does, ties and overflow included; bf16 -> fp32 is
    exact."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * torch.logspace(-30, 30, 4096)
    ties = (torch.arange(-64, 64, dtype=torch.int32) * 2**16 + 2**15 + (1 << 23) * 127).view(torch.float32)
    x = torch.cat([x, ties, torch.tensor([0.0, -0.0, 3.4e38, -3.4e38, float("inf"), float("-inf")])])
    bits = fp32_to_bf16_bits(x.numpy())
    assert np.array_equal(bits, x.bfloat16().view(torch.int16).numpy().view(np.uint16))
    assert np.isnan(bf16_bits_to_fp32(fp32_to_bf16_bits(np.array([np.nan], np.float32))))
    assert torch.equal(torch.from_numpy(bf16_bits_to_fp32(bits)), x.bfloat16().float())


@triton.jit
def _bf16_dot_kernel(a, b, c, N: tl.constexpr):
    o = tl.arange(0, N)
    b_a = tl.load(a + o[:, None] * N + o[None, :])
    b_b = tl.load(b + o[:, None] * N + o[None, :])
    tl.store(c + o[:, None] * N + o[None, :], tl.dot(b_a, b_b).to(tl.bfloat16))


def test_interpreted_bf16_dot_is_the_gpu_arithmetic():
    """tl.dot of bf16 tiles: exact products summed in fp32, then one rounding to bf16, as on the GPU."""
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(16, 16, generator=gen).bfloat16() for _ in range(2))
    c = torch.empty(16, 16, dtype=torch.bfloat16)
    _bf16_dot_kernel[(1,)](a, b, c, N=16)
    exact = a.double() @ b.double()
    # an fp32 sum of 16 exact products errs by at most 16 u32 sum|a b|; the cast to bf16 adds u16 of the value
    accumulated = 16 * 2.0**-24 * (a.double().abs() @ b.double().abs())
    assert ((c.double() - exact).abs() <= 2.0**-8 * exact.abs() + 2 * accumulated).all()
