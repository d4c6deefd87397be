"""A Gated DeltaNet layer's decode step in one launch (conv + delta rule + gated norm): the reference is the three
unfused reference ops in sequence, and the Triton kernel (interpreted on the CPU, compiled on a GPU) matches it, the
conv window and the recurrent state included, with shared q/k heads, a head size that leaves a masked tile, inputs
that are rows of one wider projection, and fp32, bf16 and fp16 inputs."""

import pytest
import torch
from helpers import assert_rel_rmse, requires_cuda

from hybridize.kernels.conv1d import reference as conv_reference
from hybridize.kernels.gated_delta import GateParams, gated_delta_layer_step, reference
from hybridize.kernels.norm import reference as norm_reference

W = 4  # the conv width every layer uses


def _inputs(B, HK, H, K, V, dtype=torch.float32, device="cpu", seed=0):
    """The step's inputs as the static decoder has them: qkv, a, b and the gate as views of one [B, N] row per
    sequence (with spare columns), a filled conv window and state, and gate parameters at the converted layers'
    scale (half-lives of tens to hundreds of tokens, write strengths around 0.4)."""
    gen = torch.Generator().manual_seed(seed)
    channels = 2 * HK * K + H * V
    wide = torch.randn(B, channels + 2 * H + H * V + 3, generator=gen)
    qkv, a, b, gate, _ = wide.split([channels, H, H, H * V, 3], -1)
    tensors = dict(
        qkv=qkv, a=a, b=b, gate=gate,
        conv_weight=torch.randn(channels, W, generator=gen) * W**-0.5,
        conv_state=torch.randn(B, channels, W - 1, generator=gen),
        state=torch.randn(B, H, K, V, generator=gen) * 0.3,
        A_log=torch.rand(H, generator=gen) - 3.0, dt_bias=torch.randn(H, generator=gen),
        b_bias=torch.randn(H, generator=gen) * 0.5 - 0.4, norm_weight=1.0 + 0.1 * torch.randn(V, generator=gen),
    )
    tensors = {name: t.to(device) for name, t in tensors.items()}
    for name in ("qkv", "a", "b", "gate", "conv_weight", "conv_state", "norm_weight"):
        tensors[name] = tensors[name].to(dtype)  # the model's dtype; the state and gate parameters stay fp32
    return tensors


def _step(tensors, HK, backend):
    t = tensors
    return gated_delta_layer_step(t["qkv"], t["a"], t["b"], t["gate"], t["conv_weight"], t["conv_state"], t["state"],
                                  GateParams(t["A_log"], t["dt_bias"], t["b_bias"]), t["norm_weight"], k_heads=HK,
                                  norm_eps=1e-5, backend=backend)


def test_reference_is_the_unfused_reference_ops():
    """The fused reference equals conv step -> delta step (raw gates, q/k norms) -> gated norm, called one by one."""
    B, HK, H, K, V = 2, 1, 2, 8, 8
    t = _inputs(B, HK, H, K, V)
    expected = {name: x.clone() for name, x in t.items()}
    o = _step(t, HK, "reference")
    e = expected
    y = conv_reference.causal_conv1d_step(e["qkv"], e["conv_weight"], None, conv_state=e["conv_state"],
                                          activation="silu")
    q, k, v = y.split([HK * K, HK * K, H * V], -1)
    o_delta = reference.gated_delta_step(q.view(B, HK, K), k.view(B, HK, K), v.view(B, H, V), e["a"], e["b"],
                                         e["state"], gate_params=GateParams(e["A_log"], e["dt_bias"], e["b_bias"]),
                                         qk_l2norm=True)
    o_expected = norm_reference.gated_rms_norm(o_delta, e["gate"].view(B, H, V), e["norm_weight"], eps=1e-5)
    assert torch.equal(o, o_expected.reshape(B, H * V))
    assert torch.equal(t["conv_state"], e["conv_state"]) and torch.equal(t["state"], e["state"])
    assert not torch.equal(t["state"], _inputs(B, HK, H, K, V)["state"]), "the state must be updated in place"


def _check_against_reference(B, HK, H, K, V, dtype, device):
    t = _inputs(B, HK, H, K, V, dtype, device)
    before = {name: x.clone() for name, x in t.items()}
    r = {name: x.clone() for name, x in t.items()}
    o, o_ref = _step(t, HK, "triton"), _step(r, HK, "reference")
    # Both compute in fp32 from the same inputs; the kernel's sums run in another order, so they differ by fp32
    # rounding (a few units of 1e-7 relative) before the output's one rounding to the dtype.
    eps = torch.finfo(dtype).eps
    assert_rel_rmse(o.float(), o_ref.float(), max(eps, 1e-6), "o")
    assert_rel_rmse(t["state"], r["state"], 1e-6, "state")
    assert torch.equal(t["conv_state"], r["conv_state"]), "the conv window holds inputs: shifted, never rounded"
    assert torch.equal(t["conv_state"][..., :-1], before["conv_state"][..., 1:])
    assert torch.equal(t["conv_state"][..., -1], before["qkv"])
    for name in ("qkv", "a", "b", "gate"):
        assert torch.equal(t[name], before[name]), f"{name} is an input: left as it was"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, HK, H, K, V", [(3, 2, 2, 16, 16), (2, 1, 3, 16, 8), (2, 2, 4, 12, 24)],
                         ids=["heads", "shared-qk", "masked-tiles"])
def test_triton_matches_the_reference(B, HK, H, K, V, dtype):
    _check_against_reference(B, HK, H, K, V, dtype, "cpu")


def test_triton_steps_follow_the_recurrence():
    """Eight steps in a row: each step's window and state are the next one's input, so an error in either compounds."""
    B, HK, H, K, V = 2, 1, 2, 8, 8
    t, r = _inputs(B, HK, H, K, V), _inputs(B, HK, H, K, V)
    for step in range(8):
        fresh = _inputs(B, HK, H, K, V, seed=step + 1)
        for name in ("qkv", "a", "b", "gate"):
            t[name], r[name] = fresh[name], fresh[name].clone()
        assert_rel_rmse(_step(t, HK, "triton"), _step(r, HK, "reference"), 1e-6, f"o at step {step}")
    assert_rel_rmse(t["state"], r["state"], 1e-6, "state")


def test_rejects_mismatched_shapes():
    t = _inputs(2, 1, 2, 8, 8)
    t["gate"] = t["gate"][:, :-1]
    with pytest.raises(ValueError, match="do not fit"):
        _step(t, 1, "triton")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, HK, H, K, V", [(16, 9, 9, 64, 64), (4, 4, 8, 128, 128), (2, 2, 4, 12, 24)])
def test_triton_matches_the_reference_cuda(B, HK, H, K, V, dtype):
    _check_against_reference(B, HK, H, K, V, dtype, "cuda")
    torch.cuda.synchronize()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_compiled_step_keeps_its_writes(device):
    """Under torch.compile (fullgraph, as the static decoder compiles its step) the launch is one opaque op whose
    in-place writes to the conv window and the state are declared: two compiled steps give eager's outputs and
    leave eager's conv window and state."""
    B, HK, H, K, V = 2, 1, 2, 8, 8

    def two_steps(t):
        first = _step(t, HK, "triton")
        return first, _step(t, HK, "triton")

    t, r = _inputs(B, HK, H, K, V, device=device), _inputs(B, HK, H, K, V, device=device)
    with torch.inference_mode():
        got = torch.compile(two_steps, fullgraph=True, dynamic=False)(t)
        expected = two_steps(r)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert torch.equal(t["conv_state"], r["conv_state"])
    torch.testing.assert_close(t["state"], r["state"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(got[0], got[1]), "the second step must see the first one's writes"
