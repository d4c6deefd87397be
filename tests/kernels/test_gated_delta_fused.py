"""Gated delta rule on raw inputs (gate_params, qk_l2norm) against the un-fused fp32 computation, every gradient.

The ground truth forms q / |q|, k / |k|, g = -exp(A_log) softplus(a + dt_bias) and beta = sigmoid(b + b_bias) in fp32
PyTorch, as the layer's un-fused path does, and runs the token loop on them; autograd carries its gradients back to
the raw inputs. The Triton tests run interpreted on the CPU at small shapes; the CUDA twins at the model's shapes.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from helpers import assert_rel_rmse, requires_cuda
import test_gated_delta
from test_gated_delta import CASES, FP32_TOL, HALF_TOL, LONG_TOL, STRONG_GATE_CASES

from hybridize.kernels.gated_delta import GateParams, chunk_gated_delta_rule, gated_delta_step, reference
from hybridize.kernels.gated_delta.inputs import l2norm_bwd, l2norm_fwd, softplus
from hybridize.model.gated_deltanet import l2_normalize

guard = test_gated_delta.guard  # the fixture: NaN guard bands around every buffer the kernels allocate

RAW = ["q", "k", "v", "a", "b", "A_log", "dt_bias", "b_bias"]
PARAMS = ["dA_log", "ddt_bias", "db_bias"]
# fp32: the un-fused tolerances, a and b as g and beta (da is dg times the gate's slope, db dbeta times beta's)
FUSED_FP32_TOL = {**FP32_TOL, "da": FP32_TOL["dg"], "db": FP32_TOL["dbeta"],
                  **dict.fromkeys(PARAMS, FP32_TOL["dg"])}
# 16-bit: one rounding more than the un-fused op on every path, the normalized q and k stored in the input dtype
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
FUSED_HALF_TOL = {dtype: HALF_TOL[dtype] + u for dtype, u in UNIT_ROUNDOFF.items()}
FUSED_LONG_TOL = {dtype: LONG_TOL[dtype] + u for dtype, u in UNIT_ROUNDOFF.items()}


def make_raw_inputs(B, T, HK, H, K, V, *, N=None, init=True, dtype=torch.float32, device="cpu", seed=0, rate=None):
    """Raw layer inputs: q, k of norms spread over 0.1..10 (the norm's Jacobian matters), v; a, b ~ N(0, 1); A_log,
    dt_bias as the layer initializes them (decays e^-0.001 .. e^-16 a token), or A_log = log(rate) and dt_bias 3
    for strong gates (decays beyond e^-0.7 rate); b_bias ~ N(0, 1). q, k, v, a, b in `dtype`; the parameters and
    the state fp32."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    rand = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k = (randn(B, T, HK, K) * 10 ** (2 * rand(B, T, HK, 1) - 1) for _ in range(2))
    v, a, b = randn(B, T, H, V), randn(B, T, H), randn(B, T, H)
    if rate is None:
        A_log = torch.log(1 + 15 * rand(H))
        dt = torch.exp(rand(H) * math.log(100) + math.log(0.001))  # 0.001 .. 0.1
        dt_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    else:
        A_log, dt_bias = torch.full((H,), float(rate)).log(), torch.full((H,), 3.0)
    b_bias = randn(H)
    h0 = (0.5 * randn(N or B, H, K, V)).to(device, torch.float32) if init else None
    raw = [x.to(device, dtype) for x in (q, k, v, a, b)]
    raw += [x.to(device, torch.float32) for x in (A_log, dt_bias, b_bias)]
    return raw, h0


def unfused(q, k, v, a, b, A_log, dt_bias, b_bias, **kw):
    """The un-fused fp32 computation: the layer's norm and gate formulas in PyTorch, then the token loop."""
    q, k = l2_normalize(q.float()), l2_normalize(k.float())
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    beta = torch.sigmoid(b.float() + b_bias.float())
    for x in (q, k, g, beta):
        if x.requires_grad:
            x.retain_grad()
    o, ht = reference.recurrent_gated_delta_rule(q, k, v.float(), g, beta, **kw)
    unfused.intermediates = dict(q=q, k=k, g=g, beta=beta)  # for the floors of the strong-gate checks
    return o, ht


def fused(backend, **options):
    def run(q, k, v, a, b, A_log, dt_bias, b_bias, **kw):
        return chunk_gated_delta_rule(q, k, v, a, b, gate_params=GateParams(A_log, dt_bias, b_bias), qk_l2norm=True,
                                      backend=backend, **options, **kw)
    return run


def run_with_grads(fn, raw, h0, cu_seqlens=None, seed=1, place=torch.clone):
    """o, the final state and the gradients of a random linear loss of both to every raw input and h0."""
    leaves = [place(x.detach()).requires_grad_() for x in raw]
    h0 = None if h0 is None else place(h0.detach()).requires_grad_()
    o, ht = fn(*leaves, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).to(o.device)
    dht = torch.randn(ht.shape, generator=gen).to(ht.device)
    ((o.float() * do).sum() + (ht * dht).sum()).backward()
    out = {"o": o, "ht": ht, **{f"d{name}": x.grad for name, x in zip(RAW, leaves)}}
    if h0 is not None:
        out["dh0"] = h0.grad
    return out


def assert_fused_close(actual: dict, expected: dict, tol: dict, terms: dict | None = None):
    """Relative RMSE per tensor. A per-head parameter gradient is a sum over tokens whose terms may cancel, so it is
    held to tol times the sum of its terms' sizes (`terms`, from the ground truth) when those are given."""
    assert actual.keys() == expected.keys()
    for name in expected:
        if terms and name in terms:
            err = (actual[name].double() - expected[name].double()).abs()
            assert torch.isfinite(actual[name]).all(), f"{name}: NaN/inf"
            bound = tol[name] * terms[name].double()
            assert (err <= bound).all(), f"{name}: errors {err.tolist()} > {bound.tolist()}"
        else:
            assert_rel_rmse(actual[name].float(), expected[name].float(), tol[name], name)


def parameter_terms(raw, expected) -> dict:
    """Per head, the sum over tokens of the sizes of the terms of dA_log (dg g), ddt_bias (da) and db_bias (db)."""
    inter = unfused.intermediates
    per_head = lambda x: x.abs().flatten(0, 1).sum(0).detach()  # noqa: E731
    return {"dA_log": per_head(inter["g"].grad * inter["g"]), "ddt_bias": per_head(expected["da"]),
            "db_bias": per_head(expected["db"])}


def _check(B, T, HK, H, K, V, cu, dtype, tol, device="cpu", place=torch.clone, **make):
    N = B if cu is None else len(cu) - 1
    raw, h0 = make_raw_inputs(B, T, HK, H, K, V, N=N, dtype=dtype, device=device, **make)
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    expected = run_with_grads(unfused, raw, h0, cu_seqlens)
    terms = parameter_terms(raw, expected)
    actual = run_with_grads(fused("triton"), raw, h0, cu_seqlens, place=place)
    assert_fused_close(actual, expected, tol, terms)


@pytest.mark.parametrize("B, T, HK, H, K, V, cu, init, chunk_size", CASES)
def test_fused_chunk_matches_unfused_loop(B, T, HK, H, K, V, cu, init, chunk_size, guard):
    N = B if cu is None else len(cu) - 1
    raw, h0 = make_raw_inputs(B, T, HK, H, K, V, N=N, init=init)
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    expected = run_with_grads(unfused, raw, h0, cu_seqlens)
    actual = run_with_grads(fused("triton", chunk_size=chunk_size), raw, h0, cu_seqlens, place=guard.place)
    assert_fused_close(actual, expected, FUSED_FP32_TOL, parameter_terms(raw, expected))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, T, HK, H, K, V, cu", [(2, 63, 2, 4, 16, 32, None),
                                                    (1, 150, 2, 4, 16, 16, [0, 17, 80, 150])])
def test_fused_chunk_half_precision(B, T, HK, H, K, V, cu, dtype, guard):
    _check(B, T, HK, H, K, V, cu, dtype, dict.fromkeys(FUSED_FP32_TOL, FUSED_HALF_TOL[dtype]), place=guard.place)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, T, HK, H, K, V, cu", STRONG_GATE_CASES[1:])
def test_fused_chunk_strong_gates(B, T, HK, H, K, V, cu, dtype, guard):
    """Decays of ~e^-50 a token in partial chunks: everything finite; the gate's gradients, differences of terms
    far larger than themselves there, held to tol times the size of those terms."""
    _check_strong(B, T, HK, H, K, V, cu, dtype, "cpu", place=guard.place)


def _check_strong(B, T, HK, H, K, V, cu, dtype, device, place=torch.clone):
    N = B if cu is None else len(cu) - 1
    raw, h0 = make_raw_inputs(B, T, HK, H, K, V, N=N, dtype=dtype, device=device, rate=50.0)
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    expected = run_with_grads(unfused, raw, h0, cu_seqlens)
    inter = unfused.intermediates
    assert inter["g"][:, :3].sum(1).max() < -88  # the cumulative gate leaves exp's fp32 range within 3 tokens
    actual = run_with_grads(fused("triton"), raw, h0, cu_seqlens, place=place)
    tol = HALF_TOL[dtype] + UNIT_ROUNDOFF.get(dtype, 0.0)
    for name in ("o", "ht", "dq", "dk", "dv", "db"):
        assert_rel_rmse(actual[name].float(), expected[name].float(), tol, name)
    # dg's terms: q . dq and k . dk of the unit q, k, ~ |dq| + |dk| (test_gated_delta.assert_matches_with_floor);
    # da is dg times the slope of the gate; dA_log and ddt_bias sum dg g and da over the tokens
    dg_terms = sum(inter[x].grad.norm(dim=-1).repeat_interleave(H // HK, 2) for x in ("q", "k")).double()  # [B, T, H]
    a, A_log, dt_bias = (x.double() for x in (raw[3], raw[5], raw[6]))
    slope = A_log.exp() * torch.sigmoid(a + dt_bias)  # |dg / da|, [B, T, H]
    per_head = lambda x: x.flatten(0, 1).sum(0)  # noqa: E731
    floors = {"da": (dg_terms * slope).pow(2).mean().sqrt(), "dh0": torch.tensor(1.0, dtype=torch.float64),
              "dA_log": per_head(dg_terms * inter["g"].detach().double().abs()), "ddt_bias": per_head(dg_terms * slope)}
    for name, floor in floors.items():
        assert torch.isfinite(actual[name]).all(), f"{name}: NaN/inf"
        err = actual[name].double() - expected[name].double()
        if name in ("da", "dh0"):
            err, floor = err.pow(2).mean().sqrt(), torch.maximum(expected[name].double().pow(2).mean().sqrt(), floor)
        assert (err.abs() <= tol * floor.to(err.device)).all(), f"{name}: {err} > {tol:.0e} x {floor}"
    assert_fused_close({"db_bias": actual["db_bias"]}, {"db_bias": expected["db_bias"]}, {"db_bias": tol},
                       {"db_bias": parameter_terms(raw, expected)["db_bias"]})


def test_fused_chunk_reads_strided_views():
    """q, k, v and a, b as the layer has them, views into one projection whose token rows are longer than each view's
    row (the kernels read q, k, v, a, b at that stride): bit for bit what contiguous copies give, gradients included."""
    raw, h0 = make_raw_inputs(2, 45, 2, 4, 16, 16)
    expected = run_with_grads(fused("triton"), raw, h0)
    actual = run_with_grads(fused("triton"), raw, h0, place=_as_strided_view)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def _as_strided_view(x: torch.Tensor) -> torch.Tensor:
    """x's values in a view whose token rows sit 7 elements apart more than the row needs (as split views do)."""
    if x.dim() < 3:
        return x.clone()
    B, T = x.shape[:2]
    row = x[0, 0].numel()
    buf = torch.full((B, T, row + 7), float("nan"), dtype=x.dtype, device=x.device)
    buf[..., :row] = x.flatten(2)
    return buf[..., :row].unflatten(-1, x.shape[2:])


@pytest.mark.parametrize("options", [dict(gate=True, norm=False), dict(gate=False, norm=True)])
def test_each_raw_input_option_alone(options, guard):
    """gate_params and qk_l2norm are independent: each alone against the un-fused computation of its part."""
    B, T, HK, H, K, V = 1, 70, 1, 2, 16, 16
    raw, h0 = make_raw_inputs(B, T, HK, H, K, V, seed=4)
    q, k, v, a, b, A_log, dt_bias, b_bias = raw
    if not options["norm"]:
        q, k = l2_normalize(q), l2_normalize(k)
    if not options["gate"]:
        a = -A_log.exp() * F.softplus(a + dt_bias)
        b = torch.sigmoid(b + b_bias)
    params = GateParams(A_log, dt_bias, b_bias) if options["gate"] else None
    kw = dict(initial_state=h0, output_final_state=True, gate_params=params, qk_l2norm=options["norm"])
    o, ht = chunk_gated_delta_rule(q, k, v, a, b, backend="triton", **kw)
    o_ref, ht_ref = unfused(*raw, initial_state=h0, output_final_state=True)
    assert_rel_rmse(o, o_ref, 1e-5, "o")
    assert_rel_rmse(ht, ht_ref, 1e-5, "ht")


@pytest.mark.parametrize("fn", ["chunk", "recurrent"])
def test_reference_raw_inputs_equal_unfused_fp64(fn):
    """The PyTorch references' gate_params / qk_l2norm form the same inputs as the layer's un-fused formulas."""
    raw, h0 = make_raw_inputs(2, 70, 2, 4, 16, 16)
    raw = [x.double() for x in raw]
    op = getattr(reference, f"{fn}_gated_delta_rule")
    kw = dict(initial_state=h0.double(), output_final_state=True)
    o, ht = op(*raw[:5], gate_params=GateParams(*raw[5:]), qk_l2norm=True, **kw)
    q, k, v, a, b, A_log, dt_bias, b_bias = raw
    g, beta = -A_log.exp() * F.softplus(a + dt_bias), torch.sigmoid(b + b_bias)
    q, k = (x * (x.pow(2).sum(-1, keepdim=True) + 1e-6).rsqrt() for x in (q, k))  # in fp64 (the layer's: fp32)
    o_ref, ht_ref = reference.recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
    assert_rel_rmse(o, o_ref, 1e-10, "o")
    assert_rel_rmse(ht, ht_ref, 1e-10, "ht")


def test_raw_inputs_reject_bad_gate_params():
    raw, h0 = make_raw_inputs(1, 8, 1, 2, 16, 16)
    bad = GateParams(raw[5][:1], raw[6], raw[7])
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError):
            chunk_gated_delta_rule(*raw[:5], gate_params=bad, backend=backend)
        with pytest.raises(ValueError):
            gated_delta_step(*(x[:, 0] for x in raw[:5]), h0, gate_params=bad, backend=backend)


# ---- the pieces: softplus, the L2-norm prologue and epilogue ----


@triton.jit
def _softplus_kernel(x, y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(y + o, softplus(tl.load(x + o)))


def test_softplus_is_accurate_to_a_few_ulps():
    """Over the layer's range (a + dt_bias ~ -7: softplus ~ 1e-3) and beyond, relative error a few eps, where
    log(1 + exp(x)) rounded in fp32 keeps only the bits of exp(x) above 1's (relative error ~eps / softplus)."""
    x = torch.linspace(-40, 40, 1024)
    y = torch.empty_like(x)
    _softplus_kernel[(1,)](x, y, N=1024)
    expected = F.softplus(x.double())
    rel = ((y.double() - expected).abs() / expected).max().item()
    # exp, log, a quotient and a product, each within an ulp or two
    assert rel < 8 * 2.0**-24, f"softplus: relative error {rel:.1e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("HK, H", [(3, 3), (2, 6)])
def test_l2norm_prologue_and_epilogue_match_autograd(dtype, HK, H):
    """Normalized q, k and rstd, and the gradients of the raw q, k from per-value-head gradients (summed over each
    shared head's group), against autograd of the fp32 formula. K = 40: a partial K tile; strided inputs."""
    B, T, K = 2, 37, 40
    gen = torch.Generator().manual_seed(0)
    q, k = (_as_strided_view((torch.randn(B, T, HK, K, generator=gen) * 3).to(dtype)) for _ in range(2))
    dqn, dkn = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    qn, kn, rstd_q, rstd_k = l2norm_fwd(q, k)
    grad_dtype = dtype if H == HK else torch.float32  # what the chunk backward hands over
    dq, dk = l2norm_bwd(dqn.to(grad_dtype), dkn.to(grad_dtype), qn, kn, rstd_q, rstd_k)
    u = UNIT_ROUNDOFF.get(dtype, 4 * 2.0**-24)
    for x, y, r, dy, dx, name in ((q, qn, rstd_q, dqn, dq, "q"), (k, kn, rstd_k, dkn, dk, "k")):
        leaf = x.float().requires_grad_()
        expected = l2_normalize(leaf)
        expected.backward(dy.to(grad_dtype).float().unflatten(2, (HK, H // HK)).sum(3))
        assert y.dtype == dtype and dx.dtype == dtype and r.dtype == torch.float32
        assert_rel_rmse(y, expected, u, f"{name} normalized")
        assert_rel_rmse(r, x.float().pow(2).sum(-1).add(1e-6).rsqrt(), 4 * 2.0**-24, f"rstd {name}")
        # the stored normalized values (rounded, u/2) enter the Jacobian; the result rounds once more
        assert_rel_rmse(dx, leaf.grad, 4 * u, f"d{name}")


# ---- the decode step ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, HK, H, K, V", [(3, 2, 4, 32, 24), (2, 1, 1, 40, 16)])
def test_fused_step_matches_unfused_step(B, HK, H, K, V, dtype):
    """Triton and reference steps on raw inputs against the un-fused step fed the fp32-formed inputs (fp32 norms and
    gates in the kernel: only the output's rounding to the input dtype differs). Three tokens: the state carries."""
    raw, h0 = make_raw_inputs(B, 3, HK, H, K, V, dtype=dtype, seed=3)
    q, k, v, a, b, A_log, dt_bias, b_bias = raw
    qn, kn = l2_normalize(q.float()), l2_normalize(k.float())
    g, beta = -A_log.exp() * F.softplus(a.float() + dt_bias), torch.sigmoid(b.float() + b_bias)
    states = {name: h0.clone() for name in ("triton", "reference", "unfused")}
    u = UNIT_ROUNDOFF.get(dtype, 2.0**-24)
    for t in range(3):
        o_ref = reference.gated_delta_step(qn[:, t], kn[:, t], v[:, t].float(), g[:, t], beta[:, t],
                                           states["unfused"])
        for backend in ("triton", "reference"):
            o = gated_delta_step(q[:, t], k[:, t], v[:, t], a[:, t], b[:, t], states[backend],
                                 gate_params=GateParams(A_log, dt_bias, b_bias), qk_l2norm=True, backend=backend)
            assert o.dtype == dtype
            # one conversion to the input dtype, rounded: within u
            assert_rel_rmse(o, o_ref, u + 1e-6, f"o {backend} token {t}")
            assert_rel_rmse(states[backend], states["unfused"], 1e-6, f"state {backend} token {t}")
    assert not torch.equal(states["triton"], h0)


# ---- GPU: the model's shapes, bf16 and fp16 against the fp32 un-fused computation ----

FUSED_GPU_CASES = [
    (2, 500, 4, 8, 128, 128, None),
    (1, 2048, 2, 4, 64, 64, None),
    (1, 2048, 4, 8, 128, 128, [0, 300, 1100, 2048]),
    (2, 777, 8, 8, 64, 128, None),
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, T, HK, H, K, V, cu", FUSED_GPU_CASES)
def test_fused_chunk_cuda(B, T, HK, H, K, V, cu, dtype, guard):
    _check(B, T, HK, H, K, V, cu, dtype, dict.fromkeys(FUSED_FP32_TOL, FUSED_LONG_TOL[dtype]), device="cuda",
           place=guard.place)
    torch.cuda.synchronize()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, T, HK, H, K, V, cu", STRONG_GATE_CASES + [(2, 1000, 4, 8, 128, 128, None)])
def test_fused_chunk_strong_gates_cuda(B, T, HK, H, K, V, cu, dtype, guard):
    _check_strong(B, T, HK, H, K, V, cu, dtype, "cuda", place=guard.place)
    torch.cuda.synchronize()


@requires_cuda
@pytest.mark.parametrize("B, HK, H, D", [(64, 8, 16, 128), (7, 9, 9, 64)])
def test_fused_step_cuda(B, HK, H, D):
    raw, h0 = make_raw_inputs(B, 1, HK, H, D, D, dtype=torch.bfloat16, device="cuda", seed=5)
    q, k, v, a, b, A_log, dt_bias, b_bias = (x[:, 0] if x.dim() > 1 else x for x in raw)
    g, beta = -A_log.exp() * F.softplus(a.float() + dt_bias), torch.sigmoid(b.float() + b_bias)
    state, state_ref = h0.clone(), h0.clone()
    o = gated_delta_step(q, k, v, a, b, state, gate_params=GateParams(A_log, dt_bias, b_bias), qk_l2norm=True)
    o_ref = reference.gated_delta_step(l2_normalize(q.float()), l2_normalize(k.float()), v, g, beta, state_ref)
    assert_rel_rmse(o, o_ref, 2.0**-8, "o")
    assert_rel_rmse(state, state_ref, 1e-5, "state")


def test_compiled_fused_step_matches_eager():
    """Under torch.compile the step on raw inputs stays one opaque op (its parameters and flag in the schema): one
    graph, the same output and state as eager."""
    raw, h0 = make_raw_inputs(2, 1, 1, 2, 16, 16, seed=6)
    q, k, v, a, b = (x[:, 0] for x in raw[:5])
    params = GateParams(*raw[5:])

    def step(q, k, v, a, b, state):
        return gated_delta_step(q, k, v, a, b, state, gate_params=params, qk_l2norm=True, backend="triton")

    compiled = torch.compile(step, fullgraph=True, dynamic=False)  # fullgraph: a graph break fails the test
    state, state_eager = h0.clone(), h0.clone()
    with torch.inference_mode():
        o = compiled(q, k, v, a, b, state)
        o_eager = step(q, k, v, a, b, state_eager)
    torch.testing.assert_close(o, o_eager, rtol=0, atol=0)
    torch.testing.assert_close(state, state_eager, rtol=0, atol=0)
    assert not torch.equal(state, h0)
