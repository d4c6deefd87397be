"""Gated RMSNorm: Triton (interpreted on CPU) vs the fp64 reference on the same values, forward and the x, gate and
weight gradients, each within a bound derived from the kernel's rounding (`_tolerances`)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rmse, rel_rmse, requires_cuda
from rounding import DIV, RSQRT, U, fp64_leaves, random_cotangent, rounding_tolerances, sigmoid_error

import hybridize.kernels.norm as norm
from hybridize.kernels.norm import gated_rms_norm


def _make(shape, *, gate=True, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g)).to(device=device, dtype=dtype).requires_grad_()

    # weight near 1 like a trained norm, with spread so that a wrong weight gradient shows
    return rand(*shape, scale=3.0), rand(*shape) if gate else None, rand(shape[-1], scale=0.5)


def _cotangent(y, seed=1):
    """A fixed random cotangent of y."""
    return random_cotangent(y, torch.Generator().manual_seed(seed))


def _run(backend, x, gate, weight, eps=1e-6, cotangent=None):
    """y and the gradients of <y, dy> by name; dy from `_cotangent` unless given."""
    y = gated_rms_norm(x, gate, weight, eps=eps, backend=backend)
    loss = (y.double() * (_cotangent(y) if cotangent is None else cotangent)).sum()
    leaves = {k: v for k, v in {"dx": x, "dgate": gate, "dweight": weight}.items() if v is not None}
    return {"y": y, **dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))}


def _tolerances(args, expected, eps=1e-6) -> dict:
    """`rounding_tolerances` of the Triton norm on `args` against `expected`, the fp64 reference on the same values.

    With r = (mean(x^2) + eps)^(-1/2), n = x r, s = sigmoid(g) and dy' = dy g s (dy without a gate), the kernel
    computes in fp32

        y = n w g s,   dgate = dy n w s (1 + g (1 - s)),   dweight = sum over rows of dy' n,
        dx = r (dn - n sum_k dn_k n_k / D),   dn = dy' w,

    and rounds each result to the input dtype once (u of its dtype). r's relative error R: mean(x^2) is a sum of D
    positive terms, off by sqrt(D) u relative to itself, one more for the squares, then the division by D and eps;
    rsqrt halves that and adds its own. r is common to a row, whose terms are of random sign, so it adds up like the
    others. Each output's terms, chain and the terms' relative error (in u: R for r, R + 1 for n, `sigmoid_error`
    for s, one per product) are, the parentheses with a gate only:

        y        n w (g s)                                no chain   R + 2 (+ sigmoid + 2)
        dgate    dy n w s times 1, g and -g s             2          R + 2 sigmoid + 6
        dweight  dy' n, over the rows                     rows       R + 2 (+ sigmoid + 2)
        dx       r dn_i, and r n_i dn_k n_k / D over k    D + 1      3 R + 6 + div (+ sigmoid + 2)
    """
    x, gate, weight = (None if t is None else t.detach().double() for t in args)
    D = x.shape[-1]
    dy = _cotangent(expected["y"])
    r = (x.square().mean(-1, keepdim=True) + eps).rsqrt()
    n = x * r
    R = (D**0.5 + 1 + DIV + 1) / 2 + RSQRT
    s, G = (torch.sigmoid(gate), sigmoid_error(gate)) if gate is not None else (1.0, 0.0)
    dyg = dy * gate * s if gate is not None else dy  # dy'
    gated = (G + 2) if gate is not None else 0
    dn = dyg * weight
    s2 = {
        "y": expected["y"].double().square(),
        "dweight": (dyg * n).square().reshape(-1, D).sum(0),
        "dx": (r * dn).square() + (r * n / D).square() * (dn * n).square().sum(-1, keepdim=True),
    }
    bounds = {
        "y": dict(term_error=R + 2 + gated),
        "dweight": dict(chain=x.numel() // D, term_error=R + 2 + gated),
        "dx": dict(chain=D + 1, term_error=3 * R + 6 + DIV + gated),
    }
    if gate is not None:
        s2["dgate"] = (dy * n * weight * s).square() * (1 + gate.square() * (1 + s.square()))
        bounds["dgate"] = dict(chain=2, term_error=R + 2 * G + 6)
    return {name: rounding_tolerances({name: expected[name]}, s2, u_in=U[args[0].dtype], result_casts=1,
                                      **bounds[name])[name] for name in expected}


def _compare(args, eps=1e-6):
    """Triton against the fp64 reference on the same values, output by output, within `_tolerances`."""
    expected = _run("reference", *fp64_leaves(args), eps=eps)
    actual = _run("triton", *args, eps=eps)
    assert expected.keys() == actual.keys()
    tols = _tolerances(args, expected, eps)
    for name in expected:
        assert actual[name].dtype == args[0].dtype, name
        assert_rel_rmse(actual[name], expected[name], tols[name], name)
    return expected, tols


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("shape", [(2, 63, 60), (2, 75, 3, 100), (1, 1, 100), (3, 3000), (5, 4096)])
def test_matches_reference(shape, gate):
    _compare(_make(shape, gate=gate))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tolerances_reject_norm_defects(dtype):
    """The bounds pass the kernel and reject what a wrong norm would give, rounded to the dtype as the kernel rounds:
    y without the gate, dx without its projection term -r n mean(dn n), dweight missing the last row."""
    args = _make((2, 63, 60), dtype=dtype)
    expected, tols = _compare(args)
    x, gate, weight = fp64_leaves(args)
    dy = _cotangent(expected["y"])
    r = (x.square().mean(-1, keepdim=True) + 1e-6).rsqrt()
    defects = {
        "no gate": ("y", _run("reference", x, None, weight)["y"]),
        "no projection": ("dx", r * dy * gate * torch.sigmoid(gate) * weight),
        "missed row": ("dweight", _run("reference", x, gate, weight, cotangent=dy * (torch.arange(63) < 62)[:, None])
                       ["dweight"]),
    }
    for defect, (name, wrong) in defects.items():
        assert rel_rmse(wrong.to(dtype), expected[name]) > tols[name], f"{defect}: {name} passes"


def test_reference_matches_torch_rms_norm():
    """The ground truth itself agrees with F.rms_norm followed by the SiLU gate."""
    x, gate, weight = (t.detach().double() for t in _make((3, 7, 60)))
    y = gated_rms_norm(x, gate, weight, eps=1e-5, backend="reference")
    torch.testing.assert_close(y, F.rms_norm(x, (60,), weight, eps=1e-5) * F.silu(gate))
    y = gated_rms_norm(x, None, weight, eps=1e-5, backend="reference")
    torch.testing.assert_close(y, F.rms_norm(x, (60,), weight, eps=1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eps_is_used(dtype):
    """With mean(x^2) ~ 1e-5, comparable to eps, the kernel matches the reference at each eps, and the bounds reject
    the results of a kernel that drops eps or takes ten times it."""
    x, gate, weight = _make((4, 60), dtype=dtype)
    args = ((x.detach() * 1e-3).requires_grad_(), gate, weight)
    for eps in (1e-6, 1e-4):
        expected, tols = _compare(args, eps)
        for wrong_eps in (0.0, 10 * eps):
            wrong = _run("reference", *fp64_leaves(args), eps=wrong_eps)
            for name in expected:
                assert rel_rmse(wrong[name].to(dtype), expected[name]) > tols[name], f"eps {wrong_eps}: {name} passes"


def test_non_contiguous_input():
    x, gate, _ = _make((2, 100, 8))
    weight = _make((100,), seed=2)[2]
    xt, gt = x.transpose(1, 2), gate.transpose(1, 2)  # [2, 8, 100], D axis strided
    _compare((xt, gt, weight))


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
    # each is within the bound of the fp64 result, so within twice it of the other
    assert_rel_rmse(y_tri, y_auto, 2 * _tolerances((x, gate, weight), {"y": y_auto})["y"], "y")
    with pytest.raises(ValueError, match="backend"):
        gated_rms_norm(x, gate, weight, backend="cuda")


@requires_cuda
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("shape", [(2, 2048, 16, 128), (2, 2048, 2048), (2, 2048, 4096), (1, 2048, 3000)])
def test_cuda_bf16_big(shape, gate):
    """bf16 on the GPU vs the fp64 reference on the same bf16 values."""
    _compare(_make(shape, gate=gate, dtype=torch.bfloat16, device="cuda"))
