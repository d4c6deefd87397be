"""Gated RMSNorm: Triton (interpreted on CPU) vs the fp32 reference, forward and the x, gate and weight gradients."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rmse, requires_cuda

import hybridize.kernels.norm as norm
from hybridize.kernels.norm import gated_rms_norm

TOL = 1e-5  # fp32 kernel vs fp32 reference


def _make(shape, *, gate=True, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g)).to(device=device, dtype=dtype).requires_grad_()

    # weight near 1 like a trained norm, with spread so that a wrong weight gradient shows
    return rand(*shape, scale=3.0), rand(*shape) if gate else None, rand(shape[-1], scale=0.5)


def _run(backend, x, gate, weight, eps=1e-6, seed=1):
    y = gated_rms_norm(x, gate, weight, eps=eps, backend=backend)
    g = torch.Generator().manual_seed(seed)
    loss = (y.float() * torch.randn(y.shape, generator=g).to(y.device)).sum()
    leaves = {k: v for k, v in {"dx": x, "dgate": gate, "dweight": weight}.items() if v is not None}
    return {"y": y, **dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))}


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("shape", [(2, 63, 60), (2, 75, 3, 100), (1, 1, 100), (3, 3000), (5, 4096)])
def test_matches_reference(shape, gate):
    args = _make(shape, gate=gate)
    ref, tri = _run("reference", *args), _run("triton", *args)
    assert ref.keys() == tri.keys()
    for name in ref:
        assert_rel_rmse(tri[name], ref[name], TOL, name)


def test_reference_matches_torch_rms_norm():
    """The ground truth itself agrees with F.rms_norm followed by the SiLU gate."""
    x, gate, weight = (t.detach().double() for t in _make((3, 7, 60)))
    y = gated_rms_norm(x, gate, weight, eps=1e-5, backend="reference")
    torch.testing.assert_close(y, F.rms_norm(x, (60,), weight, eps=1e-5) * F.silu(gate))
    y = gated_rms_norm(x, None, weight, eps=1e-5, backend="reference")
    torch.testing.assert_close(y, F.rms_norm(x, (60,), weight, eps=1e-5))


def test_eps_is_used():
    x, gate, weight = (t.detach() for t in _make((4, 60)))
    x = x * 1e-3  # mean(x^2) ~ 1e-5, comparable to eps
    for eps in (1e-6, 1e-4):
        assert_rel_rmse(gated_rms_norm(x, gate, weight, eps=eps, backend="triton"),
                        gated_rms_norm(x, gate, weight, eps=eps, backend="reference"), TOL, f"y eps={eps}")


def test_non_contiguous_input():
    x, gate, _ = _make((2, 100, 8))
    weight = _make((100,), seed=2)[2]
    xt, gt = x.transpose(1, 2), gate.transpose(1, 2)  # [2, 8, 100], D axis strided
    ref, tri = _run("reference", xt, gt, weight), _run("triton", xt, gt, weight)
    for name in ref:
        assert_rel_rmse(tri[name], ref[name], TOL, name)


def test_bad_shapes_raise():
    x, gate, weight = (t.detach() for t in _make((2, 60)))
    with pytest.raises(ValueError, match="gate"):
        gated_rms_norm(x, gate[:1], weight, backend="triton")
    with pytest.raises(ValueError, match="weight"):
        gated_rms_norm(x, gate, weight[:10], backend="reference")


def test_backend_switch(monkeypatch):
    x, gate, weight = (t.detach() for t in _make((2, 60)))
    calls = []
    real = norm.chunk.gated_rms_norm
    monkeypatch.setattr(norm.chunk, "gated_rms_norm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    y_auto = gated_rms_norm(x, gate, weight, backend="auto")  # CPU tensors: the reference
    assert calls == []
    y_tri = gated_rms_norm(x, gate, weight, backend="triton")
    assert calls == [1]
    assert_rel_rmse(y_tri, y_auto, TOL, "y")
    with pytest.raises(ValueError, match="backend"):
        gated_rms_norm(x, gate, weight, backend="cuda")


@requires_cuda
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("shape", [(2, 2048, 16, 128), (2, 2048, 2048), (2, 2048, 4096), (1, 2048, 3000)])
def test_cuda_bf16_big(shape, gate):
    """bf16 on the GPU vs the fp32 reference on the same bf16 values."""
    args = _make(shape, gate=gate, dtype=torch.bfloat16, device="cuda")
    ref = _run("reference", *[None if t is None else t.detach().float().requires_grad_() for t in args])
    tri = _run("triton", *args)
    for name in ref:
        assert tri[name].dtype == torch.bfloat16, name
        assert_rel_rmse(tri[name].float(), ref[name], 1e-2, name)
