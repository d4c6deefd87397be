"""The backend choice: "auto" follows the tensor's device unless HYBRIDIZE_KERNELS asks for the references (or for the
Triton kernels, interpreted on CPU tensors)."""

import pytest
import torch

from hybridize.errors import UserError
from hybridize.kernels.backend import ENVIRONMENT_VARIABLE, resolve_backend
from hybridize.kernels.gated_delta import chunk_gated_delta_rule, reference
from hybridize.kernels.ssd import chunk_ssd

from helpers import requires_cuda


def test_explicit_backend_beats_the_environment(monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "reference")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.zeros(1)) == "triton"
    assert resolve_backend("auto", torch.zeros(1)) == "reference"


def test_environment_sends_cpu_calls_to_the_interpreted_kernels(monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", torch.zeros(1)) == "triton"
    assert resolve_backend("reference", torch.zeros(1)) == "reference"  # an explicit backend still wins
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("auto", torch.zeros(1))


def test_unknown_environment_value_raises(monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "fla")
    with pytest.raises(UserError, match=ENVIRONMENT_VARIABLE):
        resolve_backend("auto", torch.zeros(1))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_recurrent_ops_refuse_mixed_dtypes_on_every_backend(backend, monkeypatch):
    """q, k in fp32 with v in bf16 (what RoPE under autocast used to hand over): one clear error on both backends,
    not a silent upcast on one and a matmul failure on the other."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    v, g = torch.randn(1, 8, 2, 16).bfloat16(), -torch.rand(1, 8, 2)
    with pytest.raises(ValueError, match="q, k, v must share a dtype"):
        chunk_gated_delta_rule(q, k, v, g, torch.rand(1, 8, 2), backend=backend)
    with pytest.raises(ValueError, match="q, k, v must share a dtype"):
        chunk_ssd(q, k, v, g, backend=backend)


@requires_cuda
def test_environment_sends_cuda_calls_to_the_reference(monkeypatch):
    x = torch.zeros(1, device="cuda")
    assert resolve_backend("auto", x) == "triton"
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "reference")
    assert resolve_backend("auto", x) == "reference"
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.nn.functional.normalize(torch.randn(1, 37, 2, 16, device="cuda", generator=gen), dim=-1)
            for _ in range(2))
    v = torch.randn(1, 37, 2, 16, device="cuda", generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(1, 37, 2, device="cuda", generator=gen))
    beta = torch.rand(1, 37, 2, device="cuda", generator=gen)
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta)
    assert torch.equal(o, reference.chunk_gated_delta_rule(q, k, v, g, beta)[0])
