"""The test setup's guard: a CUDA test never runs the interpreted kernels (conftest.pytest_runtest_setup)."""

import conftest
import pytest
import torch
from helpers import requires_cuda


def test_a_cuda_test_under_the_interpreter_stops_with_the_fix(request, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    item = request.node
    assert not conftest.interpreted_cuda_test(item)  # this test is not a CUDA test
    item.add_marker(requires_cuda)
    assert conftest.interpreted_cuda_test(item)
    with pytest.raises(pytest.fail.Exception, match="set TRITON_INTERPRET=0"):
        conftest.pytest_runtest_setup(item)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not conftest.interpreted_cuda_test(item)
    conftest.pytest_runtest_setup(item)  # compiled kernels: the test runs

