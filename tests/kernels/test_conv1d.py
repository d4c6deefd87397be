"""Causal depthwise conv: Triton (interpreted on CPU) vs the fp64 reference on the same values, forward, final state
and every gradient, each within a bound derived from the kernel's rounding (`_tolerances`)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rmse, rel_rmse, requires_cuda
from rounding import U, fp64_leaves, random_cotangent, rounding_tolerances, sigmoid_error

import hybridize.kernels.conv1d as conv1d
from hybridize.kernels.conv1d import causal_conv1d, causal_conv1d_step


def _make(T, D, W, *, B=2, N=None, bias=True, h0=True, dtype=torch.float32, device="cpu", seed=0):
    """Leaf inputs x [B, T, D], weight [D, W], bias [D] | None, initial state [N, D, W-1] | None."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    N = B if N is None else N
    return rand(B, T, D), rand(D, W), rand(D) if bias else None, rand(N, D, W - 1) if h0 else None


def _cotangents(y, ht, seed=1):
    """Fixed random cotangents of y and of the final state (None without one)."""
    g = torch.Generator().manual_seed(seed)
    return random_cotangent(y, g), None if ht is None else random_cotangent(ht, g)


def _run(backend, x, weight, bias, h0, *, activation, output_final_state=True, cu_seqlens=None, cotangents=None):
    """Outputs and the gradients of <y, dy> + <final state, dht> by name; dy, dht from `_cotangents` unless given."""
    y, ht = causal_conv1d(x, weight, bias, activation=activation, initial_state=h0,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend=backend)
    dy, dht = _cotangents(y, ht) if cotangents is None else cotangents
    loss = (y.double() * dy).sum()
    out = {"y": y}
    if output_final_state:
        loss = loss + (ht.double() * dht).sum()
        out["final_state"] = ht
    leaves = {"dx": x, "dweight": weight, "dbias": bias, "dh0": h0}
    leaves = {k: v for k, v in leaves.items() if v is not None}
    out.update(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    return out


def _tolerances(args, expected, *, activation, output_final_state=True, cu_seqlens=None) -> dict:
    """`rounding_tolerances` of the Triton conv on `args` against `expected`, the fp64 reference on the same values.

    The kernel computes in fp32 and rounds each result to the input dtype once (u of its dtype).
    z = b + sum_i w_i x_{t-W+1+i} is a chain of W additions of rounded products; y = silu(z) carries z's error times
    silu'(z), plus the sigmoid's and one product's relative error. Each gradient is a sum of terms w_i dz (dx; dh0
    alike) or dz x (dweight) or dz (dbias), with dz = dy silu'(z) = dy (s + z s - z s^2), s = sigmoid(z): chains of
    W + 2 additions (the taps, the final state's gradient, the two inside silu') for dx and dh0, of B T + 2 (every
    row) for dweight and dbias. dz's terms are off by two sigmoids and three products, and by z's own error
    (sqrt(W) + 1) u S_z, which |silu''| <= 2 sqrt(2) (s^2 + (z s)^2 + (z s^2)^2)^(1/2) makes at most
    2 sqrt(2) (sqrt(W) + 1) S_z u relative to them. The final state is a copy: exact. S2 is the reference on the
    squares of the inputs and of dz's terms, with no activation."""
    x, weight, bias, h0 = fp64_leaves(args)
    W, rows = weight.shape[1], x.shape[0] * x.shape[1]
    dy, dht = _cotangents(expected["y"], expected.get("final_state"))
    z = causal_conv1d(x, weight, bias, initial_state=h0, cu_seqlens=cu_seqlens, backend="reference")[0].detach()
    s = torch.sigmoid(z)
    silu = activation == "silu"
    dz2 = dy.square() * (s.square() * (1 + z.square() * (1 + s.square())) if silu else 1)
    squares = [None if t is None else t.detach().square().requires_grad_() for t in (x, weight, bias, h0)]
    s2 = _run("reference", *squares, activation=None, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
              cotangents=(dz2, None if dht is None else dht.square()))
    dz_error = 2 * sigmoid_error(z) + 3 + 8**0.5 * (W**0.5 + 1) * s2["y"].sqrt().max().item() if silu else 0.0
    if silu:
        s2["y"] = s2["y"] * (s * (1 + z * (1 - s))).square()
    bounds = {
        "y": dict(chain=W, term_error=1, result_error=sigmoid_error(z) + 1 if silu else 0),
        "dx": dict(chain=W + 2, term_error=1 + dz_error),
        "dh0": dict(chain=W + 2, term_error=1 + dz_error),
        "dweight": dict(chain=rows + 2, term_error=1 + dz_error),
        "dbias": dict(chain=rows + 2, term_error=dz_error),
    }
    tols = {name: rounding_tolerances({name: expected[name]}, s2, u_in=U[args[0].dtype], result_casts=1,
                                      **bounds[name])[name] for name in expected if name in bounds}
    return tols | ({"final_state": 0.0} if "final_state" in expected else {})


def _compare(args, **kw):
    """Triton against the fp64 reference on the same values, output by output, within `_tolerances`."""
    expected = _run("reference", *fp64_leaves(args), **kw)
    actual = _run("triton", *args, **kw)
    assert expected.keys() == actual.keys()
    tols = _tolerances(args, expected, **kw)
    for name in expected:
        assert actual[name].dtype == args[0].dtype, name
        assert_rel_rmse(actual[name], expected[name], tols[name], name)
    return expected, tols


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("D", [24, 100])
@pytest.mark.parametrize("T", [1, 63, 75])
def test_matches_reference_shapes(T, D, W):
    _compare(_make(T, D, W), activation="silu")


@pytest.mark.parametrize("h0, output_final_state", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference_options(bias, activation, h0, output_final_state):
    _compare(_make(63, 24, 3, bias=bias, h0=h0), activation=activation, output_final_state=output_final_state)


@pytest.mark.parametrize("varlen", [False, True])
def test_matches_reference_with_many_tiles(monkeypatch, varlen):
    """Small blocks, so that every sequence spans several programs and several backward partials."""
    monkeypatch.setattr(conv1d.chunk, "FWD_BT", 16)
    monkeypatch.setattr(conv1d.chunk, "BWD_BT", 8)
    monkeypatch.setattr(conv1d.chunk, "BWD_NS", 2)
    monkeypatch.setattr(conv1d.chunk, "FWD_BD", 16)
    monkeypatch.setattr(conv1d.chunk, "BWD_BD", 16)
    cu_seqlens = torch.tensor([0, 20, 22, 75]) if varlen else None
    args = _make(75, 24, 4, B=1 if varlen else 2, N=3 if varlen else 2)
    _compare(args, activation="silu", cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tolerances_reject_window_defects(dtype):
    """The bounds pass the kernel and reject what a wrong window would give, rounded to the dtype as the kernel
    rounds: the oldest tap dropped (y, dx, dh0), the window one step late (y), the weight and bias gradients
    missing the last row."""
    args = _make(63, 24, 4, dtype=dtype)
    expected, tols = _compare(args, activation="silu")
    x, weight, bias, h0 = fp64_leaves(args)
    dy, dht = _cotangents(expected["y"], expected["final_state"])
    defects = {
        "dropped tap": _run("reference", x, weight * torch.tensor([0.0, 1, 1, 1]), bias, h0, activation="silu"),
        "late window": {"y": expected["y"].roll(1, dims=1)},  # y_{t-1} in place of y_t
        "missed row": _run("reference", x, weight, bias, h0, activation="silu",
                           cotangents=(dy * (torch.arange(63) < 62)[:, None], dht)),
    }
    for defect, names in [("dropped tap", ("y", "dx", "dh0")), ("late window", ("y",)),
                          ("missed row", ("dweight", "dbias"))]:
        for name in names:
            wrong = defects[defect][name].to(dtype)
            assert rel_rmse(wrong, expected[name]) > tols[name], f"{defect}: {name} passes"


def test_width_one_is_a_pointwise_scale():
    x, weight, bias, _ = _make(5, 24, 1, h0=False)
    _compare((x, weight, bias, None), activation=None, output_final_state=False)
    y, ht = causal_conv1d(x, weight, bias, output_final_state=True, backend="triton")
    expected = {"y": x.double() * weight[:, 0].double() + bias.double()}
    tol = _tolerances((x, weight, bias, None), expected, activation=None, output_final_state=False)["y"]
    assert_rel_rmse(y, expected["y"], tol, "y")
    assert ht.shape == (2, 24, 0)


@pytest.mark.parametrize("W", [3, 4])
@pytest.mark.parametrize("h0", [False, True])
def test_varlen_matches_reference(W, h0):
    # the middle sequence is shorter than W-1, so its final state still holds part of its initial state
    cu_seqlens = torch.tensor([0, 20, 22, 75], dtype=torch.int32)
    args = _make(75, 100, W, B=1, N=3, h0=h0)
    _compare(args, activation="silu", cu_seqlens=cu_seqlens)


def test_varlen_reference_keeps_sequences_apart():
    """The packed reference equals one call per sequence, so neighbours never leak into each other."""
    x, weight, bias, h0 = _make(75, 24, 4, B=1, N=3)
    bounds = [0, 20, 22, 75]
    y, ht = causal_conv1d(x, weight, bias, activation="silu", initial_state=h0, output_final_state=True,
                          cu_seqlens=torch.tensor(bounds), backend="reference")
    for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        y_n, ht_n = causal_conv1d(x[:, s:e], weight, bias, activation="silu", initial_state=h0[n:n + 1],
                                  output_final_state=True, backend="reference")
        torch.testing.assert_close(y[:, s:e], y_n)
        torch.testing.assert_close(ht[n:n + 1], ht_n)


def test_varlen_empty_sequence_passes_its_state_through():
    cu_seqlens = torch.tensor([0, 3, 3, 7], dtype=torch.int64)
    args = _make(7, 24, 4, B=1, N=3)
    _compare(args, activation="silu", cu_seqlens=cu_seqlens)
    x, weight, bias, h0 = args
    _, ht = causal_conv1d(x, weight, bias, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens,
                          backend="triton")
    torch.testing.assert_close(ht[1], h0[1])


def test_reference_matches_torch_conv1d():
    """The ground truth itself agrees with F.conv1d (groups=D, left zero padding) followed by SiLU."""
    x, weight, bias, _ = _make(63, 24, 4, h0=False, dtype=torch.float64)
    y, _ = causal_conv1d(x, weight, bias, activation="silu", backend="reference")
    expected = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=3, groups=24)[..., :63]
    torch.testing.assert_close(y, F.silu(expected.transpose(1, 2)))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("T", [1, 2])
def test_final_state_when_shorter_than_width(backend, T):
    """With T < W-1 the final state is the initial state's tail followed by all of x."""
    x, weight, _, h0 = _make(T, 24, 4)
    _, ht = causal_conv1d(x, weight, initial_state=h0, output_final_state=True, backend=backend)
    expected = torch.cat([h0[..., T:], x.transpose(1, 2)], dim=-1)  # [B, D, 3]
    torch.testing.assert_close(ht, expected)
    _, ht0 = causal_conv1d(x, weight, output_final_state=True, backend=backend)
    torch.testing.assert_close(ht0, torch.cat([torch.zeros_like(h0[..., T:]), x.transpose(1, 2)], dim=-1))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("W", [2, 3, 4])
def test_step_matches_full_conv(backend, W):
    """T decode steps from the initial state give the full conv's outputs and leave its final state."""
    args = _make(9, 100, W)
    x, weight, bias, h0 = (t.detach() for t in args)
    y_full, ht = causal_conv1d(*(t.double() for t in (x, weight, bias)), activation="silu",
                               initial_state=h0.double(), output_final_state=True, backend="reference")
    state = h0.clone()
    ys = [causal_conv1d_step(x[:, t], weight, bias, conv_state=state, activation="silu", backend=backend)
          for t in range(x.shape[1])]
    tol = _tolerances(args, {"y": y_full}, activation="silu", output_final_state=False)["y"]
    assert_rel_rmse(torch.stack(ys, 1), y_full, tol, "y")
    assert torch.equal(state.double(), ht), "the state is a copy of the last inputs"


def test_step_updates_a_strided_state_in_place():
    x, weight, _, h0 = (t.detach() for t in _make(1, 24, 4))
    state = h0.transpose(1, 2).contiguous().transpose(1, 2)  # [B, D, 3] with the D axis innermost
    ptr = state.data_ptr()
    y = causal_conv1d_step(x[:, 0], weight, conv_state=state, backend="triton")
    assert state.data_ptr() == ptr
    assert torch.equal(state, torch.cat([h0[..., 1:], x[:, 0, :, None]], -1))
    expected = {"y": (torch.cat([h0, x[:, 0, :, None]], -1).double() * weight.double()).sum(-1)[:, None]}
    tol = _tolerances((x, weight, None, h0), expected, activation=None, output_final_state=False)["y"]
    assert_rel_rmse(y[:, None], expected["y"], tol, "y")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_activation_raises(backend):
    x, weight, _, h0 = (t.detach() for t in _make(4, 24, 4))
    with pytest.raises(ValueError, match="silu"):
        causal_conv1d(x, weight, activation="relu", backend=backend)
    with pytest.raises(ValueError, match="silu"):
        causal_conv1d_step(x[:, 0], weight, conv_state=h0.clone(), activation="gelu", backend=backend)


def test_bad_shapes_raise():
    x, weight, _, h0 = (t.detach() for t in _make(4, 24, 4))
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, weight[:, :3].repeat(1, 2), backend="reference")  # W = 6
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, weight, initial_state=h0[..., :2], backend="triton")
    with pytest.raises(ValueError, match="batch size"):
        causal_conv1d(x, weight, cu_seqlens=torch.tensor([0, 4]), backend="reference")


def test_backend_switch(monkeypatch):
    x, weight, _, _ = (t.detach() for t in _make(4, 24, 4))
    calls = []
    real = conv1d.chunk.causal_conv1d
    monkeypatch.setattr(conv1d.chunk, "causal_conv1d", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    y_auto, _ = causal_conv1d(x, weight, backend="auto")  # CPU tensors: the reference
    assert calls == []
    y_tri, _ = causal_conv1d(x, weight, backend="triton")
    assert calls == [1]
    # each is within the bound of the fp64 result, so within twice it of the other
    tol = _tolerances((x, weight, None, None), {"y": y_auto.double()}, activation=None, output_final_state=False)
    assert_rel_rmse(y_tri, y_auto, 2 * tol["y"], "y")
    with pytest.raises(ValueError, match="backend"):
        causal_conv1d(x, weight, backend="cuda")


@requires_cuda
@pytest.mark.parametrize("h0, activation", [(False, "silu"), (True, "silu"), (False, None)])
@pytest.mark.parametrize("D", [2048, 4096])
def test_cuda_bf16_big(D, h0, activation):
    """bf16 on the GPU vs the fp64 reference on the same bf16 values (W=4, bias, final state)."""
    _compare(_make(2048, D, 4, h0=h0, dtype=torch.bfloat16, device="cuda"), activation=activation)


@requires_cuda
def test_cuda_varlen_and_step():
    cu_seqlens = torch.tensor([0, 700, 702, 2048], dtype=torch.int32, device="cuda")
    _compare(_make(2048, 3072, 4, B=1, N=3, dtype=torch.bfloat16, device="cuda"), activation="silu",
             cu_seqlens=cu_seqlens)

    args = _make(1, 4096, 4, B=64, dtype=torch.bfloat16, device="cuda")
    x, weight, bias, h0 = (t.detach() for t in args)
    state_ref, state_tri = h0.double(), h0.clone()
    y_ref = causal_conv1d_step(x[:, 0].double(), weight.double(), bias.double(), conv_state=state_ref,
                               activation="silu", backend="reference")
    y_tri = causal_conv1d_step(x[:, 0], weight, bias, conv_state=state_tri, activation="silu", backend="triton")
    tol = _tolerances(args, {"y": y_ref[:, None]}, activation="silu", output_final_state=False)["y"]
    assert_rel_rmse(y_tri[:, None], y_ref[:, None], tol, "y_step")
    assert torch.equal(state_tri.double(), state_ref), "the state is a copy of the last inputs"
