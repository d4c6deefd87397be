"""torch.compile of a decode step that calls the Triton decode ops: one graph, the same outputs and states as eager.

On the CPU the kernels run in the Triton interpreter, which dynamo cannot trace through: the compile only
works because, under torch.compile, each launch is an opaque custom op ("hybridize::..."). conftest's
NaN-poisoned `torch.empty` is active: a fresh buffer filled in place and then written by a traced Triton
launch is what made AOT autograd reject the step on a GPU.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import requires_cuda

from hybridize.kernels.conv1d import causal_conv1d_step
from hybridize.kernels.gated_delta import gated_delta_step
from hybridize.kernels.norm import gated_rms_norm
from hybridize.kernels.ssd import ssd_step

B, H, K, V, W = 2, 2, 16, 16, 4
CHANNELS = 2 * H * K + H * V


def _step(x, a, gate, params, states, backend):
    """conv -> (q, k, v) -> gated delta and SSD steps -> gated norm, like one GDN/Mamba2 decode token."""
    weight, bias, norm_weight = params
    conv_state, delta_state, ssd_state = states
    y = causal_conv1d_step(x, weight, bias, conv_state=conv_state, activation="silu", backend=backend)  # [B, C]
    q, k, v = y.split([H * K, H * K, H * V], -1)  # views: the ops make them contiguous themselves
    q, k, v = q.view(B, H, K), F.normalize(k.view(B, H, K), dim=-1), v.view(B, H, V)
    g = -F.softplus(a)  # [B, H]
    o = gated_delta_step(q, k, v, g, a.sigmoid(), delta_state, backend=backend)  # [B, H, V]
    o = o + ssd_step(q, k, v, g, ssd_state, backend=backend)
    return gated_rms_norm(o, gate, norm_weight, backend=backend)  # [B, H, V]


def _inputs(device):
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    tokens = [(randn(B, CHANNELS), randn(B, H), randn(B, H, V)) for _ in range(3)]
    params = (randn(CHANNELS, W) * 0.5, randn(CHANNELS), 1 + 0.1 * randn(V))
    states = (randn(B, CHANNELS, W - 1), randn(B, H, K, V) * 0.1, randn(B, H, K, V) * 0.1)
    return tokens, params, states


def _run(step, tokens, params, states, backend):
    states = tuple(s.clone() for s in states)
    with torch.inference_mode():  # as in StaticDecoder
        outs = [step(*token, params, states, backend) for token in tokens]
    return outs, states


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_compiled_decode_step_matches_eager(device):
    tokens, params, states = _inputs(device)
    compiled = torch.compile(_step, fullgraph=True, dynamic=False)  # fullgraph: any graph break fails the test
    got, got_states = _run(compiled, tokens, params, states, "triton")
    eager, eager_states = _run(_step, tokens, params, states, "triton")
    reference, reference_states = _run(_step, tokens, params, states, "reference")
    for name, a, b, c in zip(["out"] * 3 + ["conv state", "delta state", "ssd state"],
                             got + list(got_states), eager + list(eager_states),
                             reference + list(reference_states)):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4, msg=name)
    # the states moved: a compiled step that dropped the in-place writes would leave them as they were
    assert not torch.equal(got_states[1], states[1]) and not torch.equal(got_states[0], states[0])


def test_ops_are_registered_with_their_writes():
    """The schema declares exactly the in-place state writes, which is what keeps them through compilation."""
    ops = torch.ops.hybridize
    schemas = {name: str(getattr(ops, name).default._schema)
               for name in ("causal_conv1d_step", "gated_delta_step", "ssd_step", "gated_rms_norm_fwd",
                            "gated_rms_norm_bwd")}
    assert "Tensor(a3!) conv_state" in schemas["causal_conv1d_step"]
    assert "Tensor(a5!) state" in schemas["gated_delta_step"]
    assert "Tensor(a4!) state" in schemas["ssd_step"]
    assert "!" not in schemas["gated_rms_norm_fwd"] and "!" not in schemas["gated_rms_norm_bwd"]


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_compiled_gated_norm_trains_like_eager(device, gated):
    """Forward and backward of the Triton norm in one compiled graph (AOT autograd, as distillation's compiled layers):
    the same output and gradients as eager. A traced backward launch fails this on the CPU (dynamo cannot trace the
    interpreter) and, with the NaN-poisoned torch.empty, on the GPU (AOT autograd rejected it there)."""
    gen = torch.Generator().manual_seed(0)
    x, gate = (torch.randn(2, 5, 3, 16, generator=gen).to(device) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(16, generator=gen)).to(device)

    def loss_and_grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x, gate, weight)]
        a, g, w = leaves
        y = fn(a, g if gated else None, w)
        (y * torch.linspace(-1, 1, 16, device=device)).sum().backward()
        return [y] + [t.grad for t in (a, w)] + ([g.grad] if gated else [])

    def norm(a, g, w):
        return gated_rms_norm(a, g, w, backend="triton")

    compiled = torch.compile(norm, backend="aot_eager", fullgraph=True)
    for got, want in zip(loss_and_grads(compiled), loss_and_grads(norm)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
