"""Causal depthwise conv: Triton (interpreted on CPU) vs the fp32 reference, forward, final state and every gradient."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rmse, requires_cuda

import hybridize.kernels.conv1d as conv1d
from hybridize.kernels.conv1d import causal_conv1d, causal_conv1d_step

TOL = 1e-5  # fp32 kernel vs fp32 reference


def _make(T, D, W, *, B=2, N=None, bias=True, h0=True, dtype=torch.float32, device="cpu", seed=0):
    """Leaf inputs x [B, T, D], weight [D, W], bias [D] | None, initial state [N, D, W-1] | None."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    N = B if N is None else N
    return rand(B, T, D), rand(D, W), rand(D) if bias else None, rand(N, D, W - 1) if h0 else None


def _run(backend, x, weight, bias, h0, *, activation, output_final_state=True, cu_seqlens=None, seed=1):
    """Outputs and gradients of a random linear loss on y and the final state, by name."""
    y, ht = causal_conv1d(x, weight, bias, activation=activation, initial_state=h0,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend=backend)
    g = torch.Generator().manual_seed(seed)
    loss = (y.float() * torch.randn(y.shape, generator=g).to(y.device)).sum()
    out = {"y": y}
    if output_final_state:
        loss = loss + (ht.float() * torch.randn(ht.shape, generator=g).to(ht.device)).sum()
        out["final_state"] = ht
    leaves = {"dx": x, "dweight": weight, "dbias": bias, "dh0": h0}
    leaves = {k: v for k, v in leaves.items() if v is not None}
    out.update(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    return out


def _compare(args, tol=TOL, **kw):
    ref = _run("reference", *args, **kw)
    tri = _run("triton", *args, **kw)
    assert ref.keys() == tri.keys()
    for name in ref:
        assert_rel_rmse(tri[name], ref[name], tol, name)


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


def test_width_one_is_a_pointwise_scale():
    x, weight, bias, _ = _make(5, 24, 1, h0=False)
    _compare((x, weight, bias, None), activation=None, output_final_state=False)
    y, ht = causal_conv1d(x, weight, bias, output_final_state=True, backend="triton")
    assert_rel_rmse(y, x * weight[:, 0] + bias, TOL, "y")
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
    x, weight, bias, h0 = (t.detach() for t in _make(9, 100, W))
    y_full, ht = causal_conv1d(x, weight, bias, activation="silu", initial_state=h0, output_final_state=True,
                               backend="reference")
    state = h0.clone()
    ys = [causal_conv1d_step(x[:, t], weight, bias, conv_state=state, activation="silu", backend=backend)
          for t in range(x.shape[1])]
    assert_rel_rmse(torch.stack(ys, 1), y_full, TOL, "y")
    torch.testing.assert_close(state, ht)


def test_step_updates_a_strided_state_in_place():
    x, weight, _, h0 = (t.detach() for t in _make(1, 24, 4))
    state = h0.transpose(1, 2).contiguous().transpose(1, 2)  # [B, D, 3] with the D axis innermost
    ptr = state.data_ptr()
    y = causal_conv1d_step(x[:, 0], weight, conv_state=state, backend="triton")
    assert state.data_ptr() == ptr
    torch.testing.assert_close(state, torch.cat([h0[..., 1:], x[:, 0, :, None]], -1))
    torch.testing.assert_close(y, (torch.cat([h0, x[:, 0, :, None]], -1) * weight).sum(-1))


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
    assert_rel_rmse(y_tri, y_auto, TOL, "y")
    with pytest.raises(ValueError, match="backend"):
        causal_conv1d(x, weight, backend="cuda")


@requires_cuda
@pytest.mark.parametrize("h0, activation", [(False, "silu"), (True, "silu"), (False, None)])
@pytest.mark.parametrize("D", [2048, 4096])
def test_cuda_bf16_big(D, h0, activation):
    """bf16 on the GPU vs the fp32 reference on the same bf16 values (W=4, bias, final state)."""
    args = _make(2048, D, 4, h0=h0, dtype=torch.bfloat16, device="cuda")
    ref_args = [None if t is None else t.detach().float().requires_grad_() for t in args]
    ref = _run("reference", *ref_args, activation=activation)
    tri = _run("triton", *args, activation=activation)
    for name in ref:
        assert tri[name].dtype == torch.bfloat16, name
        assert_rel_rmse(tri[name].float(), ref[name], 1e-2, name)


@requires_cuda
def test_cuda_varlen_and_step():
    cu_seqlens = torch.tensor([0, 700, 702, 2048], dtype=torch.int32, device="cuda")
    args = _make(2048, 3072, 4, B=1, N=3, dtype=torch.bfloat16, device="cuda")
    ref = _run("reference", *[t.detach().float().requires_grad_() for t in args], activation="silu",
               cu_seqlens=cu_seqlens)
    tri = _run("triton", *args, activation="silu", cu_seqlens=cu_seqlens)
    for name in ref:
        assert_rel_rmse(tri[name].float(), ref[name], 1e-2, name)

    x, weight, bias, h0 = (t.detach() for t in _make(1, 4096, 4, B=64, dtype=torch.bfloat16, device="cuda"))
    state_ref, state_tri = h0.float(), h0.clone()
    y_ref = causal_conv1d_step(x[:, 0].float(), weight.float(), bias.float(), conv_state=state_ref,
                               activation="silu", backend="reference")
    y_tri = causal_conv1d_step(x[:, 0], weight, bias, conv_state=state_tri, activation="silu", backend="triton")
    assert_rel_rmse(y_tri.float(), y_ref, 1e-2, "y_step")
    torch.testing.assert_close(state_tri.float(), state_ref)
