"""A recurrent layer's decode step in one launch, for Gated DeltaNet (conv + delta rule + gated norm) and Mamba2
(conv + SSD + D skip + gated norm): each reference is the unfused reference ops in sequence, and each Triton kernel
(interpreted on the CPU, compiled on a GPU) matches it, the conv window and the recurrent state included, with shared
q/k (B/C) heads, head sizes that leave masked tiles, inputs that are rows of one wider projection, and fp32, bf16 and
fp16 inputs."""

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rmse, requires_cuda

from hybridize.kernels.conv1d import reference as conv_reference
from hybridize.kernels.gated_delta import GateParams, gated_delta_layer_step
from hybridize.kernels.gated_delta import reference as gdn_reference
from hybridize.kernels.norm import reference as norm_reference
from hybridize.kernels.ssd import reference as ssd_reference
from hybridize.kernels.ssd import ssd_layer_step

W = 4  # the conv width every layer uses
PROJECTED = ("xbc", "a", "b", "gate")  # the step's inputs that come from the layer's projections


def _inputs(B, HK, H, K, V, *, bias, dtype=torch.float32, device="cpu", seed=0):
    """The step's inputs as the static decoder has them: xbc (the conv's input), a, b (raw per-head gates) and the
    output gate as views of one [B, N] row per sequence (with spare columns), a filled conv window and state, and
    per-head parameters at the converted layers' scale (half-lives of tens to hundreds of tokens)."""
    gen = torch.Generator().manual_seed(seed)
    channels = 2 * HK * K + H * V
    wide = torch.randn(B, channels + 2 * H + H * V + 3, generator=gen)
    xbc, a, b, gate, _ = wide.split([channels, H, H, H * V, 3], -1)
    tensors = dict(
        xbc=xbc, a=a, b=b, gate=gate,
        conv_weight=torch.randn(channels, W, generator=gen) * W**-0.5,
        conv_bias=torch.randn(channels, generator=gen) * 0.1 if bias else None,
        conv_state=torch.randn(B, channels, W - 1, generator=gen),
        state=torch.randn(B, H, K, V, generator=gen) * 0.3,
        A_log=torch.rand(H, generator=gen) - 3.0, dt_bias=torch.randn(H, generator=gen),
        b_bias=torch.randn(H, generator=gen) * 0.5 - 0.4, D=torch.randn(H, generator=gen),
        norm_weight=1.0 + 0.1 * torch.randn(V, generator=gen),
    )
    tensors = {name: t if t is None else t.to(device) for name, t in tensors.items()}
    for name in ("xbc", "a", "b", "gate", "conv_weight", "conv_bias", "conv_state", "norm_weight"):
        if tensors[name] is not None:  # the model's dtype; the state and per-head parameters stay fp32
            tensors[name] = tensors[name].to(dtype)
    return tensors


def _gdn_step(t, HK, backend):
    return gated_delta_layer_step(t["xbc"], t["a"], t["b"], t["gate"], t["conv_weight"], t["conv_state"], t["state"],
                                  GateParams(t["A_log"], t["dt_bias"], t["b_bias"]), t["norm_weight"], k_heads=HK,
                                  norm_eps=1e-5, backend=backend)


def _gdn_unfused(t, HK):
    """conv step -> delta step (raw gates, q/k norms) -> gated norm, the reference ops called one by one."""
    B, H, K, V = t["state"].shape
    y = conv_reference.causal_conv1d_step(t["xbc"], t["conv_weight"], None, conv_state=t["conv_state"],
                                          activation="silu")
    q, k, v = y.split([HK * K, HK * K, H * V], -1)
    o = gdn_reference.gated_delta_step(q.view(B, HK, K), k.view(B, HK, K), v.view(B, H, V), t["a"], t["b"],
                                       t["state"], gate_params=GateParams(t["A_log"], t["dt_bias"], t["b_bias"]),
                                       qk_l2norm=True)
    return norm_reference.gated_rms_norm(o, t["gate"].view(B, H, V), t["norm_weight"], eps=1e-5).reshape(B, H * V)


def _ssd_step(t, G, backend):
    return ssd_layer_step(t["xbc"], t["a"], t["gate"], t["conv_weight"], t["conv_bias"], t["conv_state"], t["state"],
                          t["A_log"], t["dt_bias"], t["D"], t["norm_weight"], groups=G, norm_eps=1e-5, backend=backend)


def _ssd_unfused(t, G):
    """conv step -> dt and decay -> SSD step -> D skip -> gated norm, as Mamba2Mixer's forward computes a token
    (a holds the raw dt and gate the raw z)."""
    B, H, N, P = t["state"].shape
    y = conv_reference.causal_conv1d_step(t["xbc"], t["conv_weight"], t["conv_bias"], conv_state=t["conv_state"],
                                          activation="silu")
    x, b, c = y.split([H * P, G * N, G * N], -1)
    x = x.view(B, H, P)
    dt = F.softplus(t["a"] + t["dt_bias"])
    o = ssd_reference.ssd_step(c.view(B, G, N), b.view(B, G, N), x * dt[..., None], -torch.exp(t["A_log"]) * dt,
                               t["state"])
    o = o + t["D"][:, None] * x
    return norm_reference.gated_rms_norm(o, t["gate"].view(B, H, P), t["norm_weight"], eps=1e-5).reshape(B, H * P)


@dataclass
class LayerStep:
    step: Callable  # (tensors, groups, backend) -> o [B, H*V]
    unfused: Callable  # (tensors, groups) -> o from the separate reference ops
    bias: bool  # whether the layer's conv has a bias


STEPS = {"gated_deltanet": LayerStep(_gdn_step, _gdn_unfused, bias=False),
         "mamba2": LayerStep(_ssd_step, _ssd_unfused, bias=True)}


@pytest.mark.parametrize("layer", STEPS)
def test_reference_is_the_unfused_reference_ops(layer):
    spec, shape = STEPS[layer], (2, 1, 2, 8, 8)
    t = _inputs(*shape, bias=spec.bias)
    expected = {name: x if x is None else x.clone() for name, x in t.items()}
    o, unfused = spec.step(t, 1, "reference"), spec.unfused(expected, 1)
    # The same fp32 ops on tensors of other layouts, which CPU kernels may sum in another order: each output passes
    # through two sums of at most 8 terms (the state contraction, the norm's mean), so the two differ by at most
    # 2 * 8 roundings of the output's scale.
    torch.testing.assert_close(o, unfused, rtol=0, atol=16 * torch.finfo(torch.float32).eps * unfused.abs().max())
    assert torch.equal(t["conv_state"], expected["conv_state"]) and torch.equal(t["state"], expected["state"])
    assert not torch.equal(t["state"], _inputs(*shape, bias=spec.bias)["state"]), "the state is updated in place"


def _check_against_reference(layer, B, HK, H, K, V, dtype, device):
    spec = STEPS[layer]
    t = _inputs(B, HK, H, K, V, bias=spec.bias, dtype=dtype, device=device)
    before = {name: x if x is None else x.clone() for name, x in t.items()}
    r = {name: x if x is None else x.clone() for name, x in t.items()}
    o, o_ref = spec.step(t, HK, "triton"), spec.step(r, HK, "reference")
    # Both compute in fp32 from the same inputs; the kernel's sums run in another order, so they differ by fp32
    # rounding (a few units of 1e-7 relative) before the output's one rounding to the dtype.
    eps = torch.finfo(dtype).eps
    assert_rel_rmse(o.float(), o_ref.float(), max(eps, 1e-6), "o")
    assert_rel_rmse(t["state"], r["state"], 1e-6, "state")
    assert torch.equal(t["conv_state"], r["conv_state"]), "the conv window holds inputs: shifted, never rounded"
    assert torch.equal(t["conv_state"][..., :-1], before["conv_state"][..., 1:])
    assert torch.equal(t["conv_state"][..., -1], before["xbc"])
    for name in PROJECTED:
        assert torch.equal(t[name], before[name]), f"{name} is an input: left as it was"


SHAPES = [(3, 2, 2, 16, 16), (2, 1, 3, 16, 8), (2, 2, 4, 12, 24)]
SHAPE_IDS = ["heads", "shared-groups", "masked-tiles"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, HK, H, K, V", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("layer", STEPS)
def test_triton_matches_the_reference(layer, B, HK, H, K, V, dtype):
    _check_against_reference(layer, B, HK, H, K, V, dtype, "cpu")


@pytest.mark.parametrize("layer", STEPS)
def test_triton_steps_follow_the_recurrence(layer):
    """Eight steps in a row: each step's window and state are the next one's input, so an error in either compounds."""
    spec, shape = STEPS[layer], (2, 1, 2, 8, 8)
    t, r = _inputs(*shape, bias=spec.bias), _inputs(*shape, bias=spec.bias)
    for step in range(8):
        fresh = _inputs(*shape, bias=spec.bias, seed=step + 1)
        for name in PROJECTED:
            t[name], r[name] = fresh[name], fresh[name].clone()
        assert_rel_rmse(spec.step(t, 1, "triton"), spec.step(r, 1, "reference"), 1e-6, f"o at step {step}")
    assert_rel_rmse(t["state"], r["state"], 1e-6, "state")


@pytest.mark.parametrize("layer", STEPS)
def test_rejects_mismatched_shapes(layer):
    spec = STEPS[layer]
    t = _inputs(2, 1, 2, 8, 8, bias=spec.bias)
    for name, wrong, message in [("gate", t["gate"][:, :-1], "do not fit"),
                                  ("conv_state", t["conv_state"][..., 1:], "conv_state must be"),
                                  ("state", t["state"].to(torch.bfloat16), "contiguous fp32")]:
        with pytest.raises(ValueError, match=message):
            spec.step({**t, name: wrong}, 1, "triton")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("layer", STEPS)
def test_compiled_step_keeps_its_writes(layer, device):
    """Under torch.compile (fullgraph, as the static decoder compiles its step) the launch is one opaque op whose
    in-place writes to the conv window and the state are declared: two compiled steps give eager's outputs and
    leave eager's conv window and state."""
    spec, shape = STEPS[layer], (2, 1, 2, 8, 8)

    def two_steps(t):
        first = spec.step(t, 1, "triton")
        return first, spec.step(t, 1, "triton")

    t, r = (_inputs(*shape, bias=spec.bias, device=device) for _ in range(2))
    with torch.inference_mode():
        got = torch.compile(two_steps, fullgraph=True, dynamic=False)(t)
        expected = two_steps(r)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert torch.equal(t["conv_state"], r["conv_state"])
    torch.testing.assert_close(t["state"], r["state"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(got[0], got[1]), "the second step must see the first one's writes"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, HK, H, K, V", [(16, 9, 9, 64, 64), (4, 4, 8, 128, 128), (2, 2, 4, 12, 24)])
@pytest.mark.parametrize("layer", STEPS)
def test_triton_matches_the_reference_cuda(layer, B, HK, H, K, V, dtype):
    _check_against_reference(layer, B, HK, H, K, V, dtype, "cuda")
    torch.cuda.synchronize()
