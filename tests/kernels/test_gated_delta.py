"""Gated delta rule: reference chunk form vs the loop, Triton (interpreted on CPU) vs the loop, decode, dispatch."""

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from helpers import assert_rel_rmse, requires_cuda

from hybridize.kernels.gated_delta import chunk, chunk_gated_delta_rule, gated_delta_step, reference
from hybridize.kernels.tuning import pinned

# Per-tensor relative-RMSE tolerances. fp32 Triton vs fp32 loop differs only by summation order.
FP32_TOL = {"o": 1e-5, "ht": 1e-5, "dq": 1e-5, "dk": 1e-5, "dv": 1e-5, "dg": 5e-5, "dbeta": 1e-5, "dh0": 1e-5}
# bf16 inputs on the GPU against the fp32 reference fed the same (rounded) inputs.
BF16_TOL = {"o": 1e-2, "ht": 1e-2, "dq": 2e-2, "dk": 2e-2, "dv": 2e-2, "dg": 5e-2, "dbeta": 2e-2, "dh0": 2e-2}


def make_inputs(B, T, HK, H, K, V, *, N=None, init=True, dtype=torch.float32, device="cpu", seed=0):
    """Layer-like inputs: L2-normalized q, k; log decay g <= 0; beta in (0, 1); optional fp32 initial state."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k = F.normalize(randn(B, T, HK, K), dim=-1), F.normalize(randn(B, T, HK, K), dim=-1)
    v = randn(B, T, H, V)
    g = F.logsigmoid(randn(B, T, H) + 2.0)  # mostly slow decay, some fast
    beta = torch.sigmoid(randn(B, T, H))
    # gates and states stay fp32 (fp64 in the fp64 tests), whatever the input dtype
    fp = torch.float64 if dtype == torch.float64 else torch.float32
    h0 = (0.5 * randn(N or B, H, K, V)).to(device, fp) if init else None
    return [x.to(device, dtype) for x in (q, k, v)] + [x.to(device, fp) for x in (g, beta)], h0


def run_with_grads(fn, inputs, h0, cu_seqlens=None, seed=1, place=torch.clone, **kw):
    """o, final state and the gradients of a random linear loss of both (dq, dk, dv, dg, dbeta, dh0).

    place: makes the leaf copies of the inputs (e.g. `GuardBands.place`)."""
    leaves = [place(x.detach()).requires_grad_() for x in inputs]
    h0 = None if h0 is None else place(h0.detach()).requires_grad_()
    o, ht = fn(*leaves, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens, **kw)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).to(o.device)
    dht = torch.randn(ht.shape, generator=gen).to(ht.device)
    ((o.float() * do).sum() + (ht * dht).sum()).backward()
    out = {"o": o, "ht": ht}
    out.update({name: x.grad for name, x in zip(["dq", "dk", "dv", "dg", "dbeta"], leaves)})
    if h0 is not None:
        out["dh0"] = h0.grad
    return out


def assert_all_close(actual: dict, expected: dict, tol: dict):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_rel_rmse(actual[name].float(), expected[name].float(), tol[name], name)


class GuardBands:
    """Puts tensors in the middle of NaN-filled buffers, with a band as long as the tensor on each side, to catch
    out-of-bounds accesses that the interpreter (or a GPU kernel that happens not to fault) lets through: a write
    past an end leaves numbers in a band (`check`), a read past an end brings NaN into the results."""

    def __init__(self, empty):
        self.empty = empty  # the unguarded torch.empty
        self.bands = []  # (shape of the guarded tensor, band before, band after)

    def alloc(self, shape, dtype, device) -> torch.Tensor:
        n = math.prod(shape)
        g = max(n, 1024)
        buf = self.empty(n + 2 * g, dtype=dtype, device=device).fill_(float("nan"))
        self.bands.append((tuple(shape), buf[:g], buf[g + n:]))
        return buf[g:g + n].view(shape)

    def place(self, x: torch.Tensor) -> torch.Tensor:
        return self.alloc(x.shape, x.dtype, x.device).copy_(x) if x.is_floating_point() else x.clone()

    def check(self):
        for shape, *bands in self.bands:
            for side, band in zip(("before", "after"), bands):
                assert torch.isnan(band).all(), f"a kernel wrote {side} a tensor of shape {shape}"


@pytest.fixture
def guard(monkeypatch):
    """Every float tensor made with torch.empty / torch.empty_like (the kernels' outputs and scratch buffers) gets
    guard bands; they are checked when the test ends."""
    empty, empty_like = torch.empty, torch.empty_like  # conftest's NaN-poisoning versions
    bands = GuardBands(empty)

    def guarded(t: torch.Tensor, plain: bool) -> torch.Tensor:
        # only plain requests (dtype, device) of dense float tensors; anything else is returned as made
        return bands.alloc(t.shape, t.dtype, t.device) if plain and t.is_floating_point() and t.is_contiguous() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: guarded(empty(*a, **kw), kw.keys() <= {"dtype", "device"}))
    monkeypatch.setattr(torch, "empty_like", lambda x, **kw: guarded(empty_like(x, **kw), kw.keys() <= {"dtype"}))
    yield bands
    bands.check()


# Every kernel that `chunk.py` autotunes, and each of its configs (test ids: kernel-BV-warps-stages, and -r with the
# register cap of a capped config).
TUNED = [name for name, obj in vars(chunk).items() if isinstance(obj, triton.runtime.Autotuner)]
ALL_CONFIGS = [
    pytest.param(name, cfg, id=f"{name}-BV{cfg.kwargs['BV']}-w{cfg.num_warps}-s{cfg.num_stages}"
                 + (f"-r{cfg.maxnreg}" if cfg.maxnreg else ""))
    for name in TUNED for cfg in getattr(chunk, name).all_configs
]


def _offered_at(name: str, config: triton.Config, K: int) -> bool:
    """Whether autotuning may pick `config` for kernel `name` at head size K: the kernel's prune, if any, keeps it."""
    prune = getattr(chunk, name).early_config_prune
    return prune is None or prune([config], {}, K=K, BK=chunk._bk(K)) == [config]


# Every (kernel, config, K) that autotuning may pick on the GPU. K=16 and 32: narrow wgmmas (see WY_FWD_CONFIGS).
EVERY_CONFIG_CASES = [
    pytest.param(*case.values, K, id=f"{case.id}-K{K}")
    for K in (16, 32, 64, 128) for case in ALL_CONFIGS if _offered_at(*case.values, K)
]
# Under the interpreter warps and stages change nothing: one config per other BV than the first config's.
BV_CONFIGS = [
    pytest.param(name, cfg, id=f"{name}-BV{bv}")
    for name in TUNED
    for bv, cfg in {c.kwargs["BV"]: c for c in reversed(getattr(chunk, name).all_configs)}.items()
    if bv != getattr(chunk, name).all_configs[0].kwargs["BV"]
]


# (B, T, HK, H, K, V, cu_seqlens, init, chunk_size): GQA, T not a multiple of the chunk, odd K/V, varlen
CASES = [
    (2, 63, 2, 4, 16, 32, None, True, 64),
    (1, 75, 1, 2, 32, 16, None, False, 64),
    (2, 1, 2, 2, 16, 16, None, True, 64),
    (1, 150, 2, 4, 16, 16, [0, 17, 80, 150], True, 64),
    (2, 75, 1, 2, 24, 40, None, True, 32),
    (1, 40, 1, 2, 80, 16, None, True, 64),
]


@pytest.mark.parametrize("T", [1, 63, 75, 200])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_reference_chunk_equals_loop_fp64(T, chunk_size):
    (q, k, v, g, beta), h0 = make_inputs(2, T, 2, 4, 16, 32, dtype=torch.float64)
    o_ref, ht_ref = reference.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, ht = reference.chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk_size
    )
    assert_rel_rmse(o, o_ref, 1e-10, "o")
    assert_rel_rmse(ht, ht_ref, 1e-10, "ht")


def test_reference_chunk_equals_loop_fp64_varlen():
    cu = torch.tensor([0, 1, 64, 139, 200])
    (q, k, v, g, beta), h0 = make_inputs(1, 200, 1, 3, 16, 16, N=4, dtype=torch.float64)
    kw = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o_ref, ht_ref = reference.recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
    o, ht = reference.chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    assert_rel_rmse(o, o_ref, 1e-10, "o")
    assert_rel_rmse(ht, ht_ref, 1e-10, "ht")
    # varlen is the same as running each sequence alone
    o1, ht1 = reference.recurrent_gated_delta_rule(
        q[:, 64:139], k[:, 64:139], v[:, 64:139], g[:, 64:139], beta[:, 64:139],
        initial_state=h0[2:3], output_final_state=True,
    )
    assert_rel_rmse(o[:, 64:139], o1, 1e-12, "o seq 2")
    assert_rel_rmse(ht[2:3], ht1, 1e-12, "ht seq 2")


def test_reference_loop_matches_definition():
    """One hand-written token of S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = scale S_t^T q_t."""
    (q, k, v, g, beta), h0 = make_inputs(1, 1, 1, 1, 4, 3, dtype=torch.float64)
    o, ht = reference.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    qt, kt, vt, a, b = q[0, 0, 0], k[0, 0, 0], v[0, 0, 0], g[0, 0, 0].exp(), beta[0, 0, 0]
    S = a * (torch.eye(4, dtype=torch.float64) - b * torch.outer(kt, kt)) @ h0[0, 0] + b * torch.outer(kt, vt)
    torch.testing.assert_close(ht[0, 0], S)
    torch.testing.assert_close(o[0, 0, 0], 4**-0.5 * S.T @ qt)


@pytest.mark.parametrize("B, T, HK, H, K, V, cu, init, chunk_size", CASES)
def test_triton_chunk_matches_loop(B, T, HK, H, K, V, cu, init, chunk_size, guard):
    N = B if cu is None else len(cu) - 1
    inputs, h0 = make_inputs(B, T, HK, H, K, V, N=N, init=init)
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    expected = run_with_grads(reference.recurrent_gated_delta_rule, inputs, h0, cu_seqlens)
    actual = run_with_grads(
        chunk_gated_delta_rule, inputs, h0, cu_seqlens, place=guard.place, backend="triton", chunk_size=chunk_size
    )
    assert_all_close(actual, expected, FP32_TOL)


# Per-tensor relative-RMSE tolerances for 16-bit inputs against the fp32 loop fed the same rounded inputs. Every
# intermediate the kernels round to the input dtype (h, v_new, dv, w, u and the operands of tl.dot) adds one rounding,
# relative u = 2^-11 (fp16) or 2^-8 (bf16); a gradient passes through at most a few such roundings that add up
# independently, and the conditioning of the unit keys and decays used here is O(1). So 4u bounds them (fp16: the
# measured errors are ~1u).
HALF_TOL = {torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8, torch.float32: 1e-5}


def strong_gate_inputs(B, T, HK, H, K, V, N, dtype, device="cpu"):
    """Layer-like inputs whose gates decay by e^-31 to e^-69 a token: the cumulative gate of a partial last chunk
    falls far below -88, where exp(-gc) overflows fp32."""
    (q, k, v, g, beta), h0 = make_inputs(B, T, HK, H, K, V, N=N, dtype=dtype, device=device)
    g = 100.0 * F.logsigmoid(torch.rand(g.shape, generator=torch.Generator().manual_seed(5))).to(g)  # e^-31..e^-69
    return [q, k, v, g, beta], h0


def assert_matches_with_floor(actual: dict, expected: dict, tol: float):
    """Relative RMSE for o, ht, dq, dk, dv, dbeta. dg and dh0 are differences of (or decay into) terms far larger
    than themselves when gates are this strong (dg: q.dq - k.dk, the true value ~e^-100 of them), so they are held
    to `tol` times the size of those terms: rms |q||dq| + |k||dk| per token for dg, rms(ht's gradient) for dh0."""
    for name in ("o", "ht", "dq", "dk", "dv", "dbeta"):
        assert_rel_rmse(actual[name].float(), expected[name].float(), tol, name)
    terms = expected["dq"].norm(dim=-1).repeat_interleave(actual["dg"].shape[2] // expected["dq"].shape[2], 2)
    terms = terms + expected["dk"].norm(dim=-1).repeat_interleave(actual["dg"].shape[2] // expected["dk"].shape[2], 2)
    floors = {"dg": terms.pow(2).mean().sqrt(), "dh0": expected["ht"].new_tensor(1.0)}  # dht ~ N(0, 1)
    for name in ("dg", "dh0"):
        assert torch.isfinite(actual[name]).all(), f"{name}: NaN/inf"
        err = (actual[name].double() - expected[name].double()).pow(2).mean().sqrt()
        scale = torch.maximum(expected[name].double().pow(2).mean().sqrt(), floors[name].double())
        assert err <= tol * scale, f"{name}: RMSE {err:.2e} > {tol:.0e} x {scale:.2e}"


# (B, T, HK, H, K, V, cu_seqlens): partial last chunks, alone, with GQA, and at every end of packed sequences
STRONG_GATE_CASES = [
    (1, 41, 1, 1, 16, 16, None),
    (2, 75, 1, 2, 32, 16, None),
    (1, 150, 2, 4, 16, 16, [0, 41, 105, 150]),
]


def _check_strong_gates(B, T, HK, H, K, V, cu, dtype, device, place=torch.clone):
    N = B if cu is None else len(cu) - 1
    inputs, h0 = strong_gate_inputs(B, T, HK, H, K, V, N, dtype, device)
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    assert inputs[3][:, :3].sum(1).max() < -88  # within 3 tokens: inside every partial chunk of the cases
    expected = run_with_grads(reference.recurrent_gated_delta_rule, [x.float() for x in inputs], h0, cu_seqlens)
    actual = run_with_grads(chunk_gated_delta_rule, inputs, h0, cu_seqlens, place=place, backend="triton")
    assert_matches_with_floor(actual, expected, HALF_TOL[dtype])
    if dtype == torch.float32 and T <= 64 and cu is None:
        # Within one chunk, in fp32, dg is right relative to itself too, its true values ~e^-50 of the q . dq terms:
        # the attention part is summed from its own (decayed) terms, the diagonal, which has no gate gradient, left
        # out. Cancelling the diagonal of q . dq - k . dk in rounding instead leaves an error of eps |q||dq|, 1e8
        # times dg here. (Over several chunks the WY terms still cancel to eps of their size: held to the floor.)
        assert_rel_rmse(actual["dg"], expected["dg"], 1e-3, "dg (relative)")
        assert_rel_rmse(actual["dh0"], expected["dh0"], FP32_TOL["dh0"], "dh0 (relative)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, T, HK, H, K, V, cu", STRONG_GATE_CASES)
def test_triton_chunk_partial_chunk_strong_gates(B, T, HK, H, K, V, cu, dtype, guard):
    """A partial last chunk (T % 64 != 0, or a packed sequence's end) whose gates decay strongly: every output and
    gradient stays finite and right."""
    _check_strong_gates(B, T, HK, H, K, V, cu, dtype, "cpu", place=guard.place)


# Long sequences in 16 bits: every gradient, the gate's included, within LONG_TOL of the fp32 loop. Derivation: a
# gradient's path rounds to the input dtype at most five times in sequence (the stored h or dh, v_new, dv, w or dw,
# and the tl.dot operands: ds, Ai, the decayed q and k), each a relative error u (2^-11 fp16, 2^-8 bf16); these add
# up at most linearly, and the WY systems of unit keys are well conditioned (componentwise growth of (I + A)^{-1}
# ~1, see _inverse_tolerance), so 5u. dg is a difference of terms (the gate's effect on attention and on the state),
# so the kernels must form it from fp32 terms and scan it from the chunk's end for this to hold (README, Precision).
LONG_TOL = {dtype: 5 * u for dtype, u in ((torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8))}


def _check_long_half(B, T, HK, H, K, V, cu, dtype, gate, device, place=torch.clone):
    N = B if cu is None else len(cu) - 1
    (q, k, v, g, beta), h0 = make_inputs(B, T, HK, H, K, V, N=N, dtype=dtype, device=device, seed=2)
    inputs = [q, k, v, gate * g, beta]
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    expected = run_with_grads(reference.recurrent_gated_delta_rule, [x.float() for x in inputs], h0, cu_seqlens)
    actual = run_with_grads(chunk_gated_delta_rule, inputs, h0, cu_seqlens, place=place, backend="triton")
    assert_all_close(actual, expected, dict.fromkeys(expected, LONG_TOL[dtype]))


# (B, T, HK, H, K, V, cu_seqlens), gate scale: 0.1 keeps a memory of ~100 tokens, 3 forgets within a few
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gate", [0.1, 3.0])
@pytest.mark.parametrize("B, T, HK, H, K, V, cu", [(1, 520, 1, 2, 64, 32, None), (1, 300, 2, 2, 32, 32, [0, 77, 300])])
def test_triton_chunk_long_half_precision(B, T, HK, H, K, V, cu, gate, dtype, guard):
    """Both 16-bit dtypes, at small heads (the CUDA twin runs them at the model shapes)."""
    _check_long_half(B, T, HK, H, K, V, cu, dtype, gate, "cpu", place=guard.place)


@pytest.mark.parametrize("name, config", BV_CONFIGS)
def test_triton_chunk_every_block_size(name, config, guard):
    """The V tiles that autotuning may pick on the GPU, which the other tests (first config only) do not run."""
    inputs, h0 = make_inputs(2, 75, 1, 2, 32, 48)  # V = 48: one partial tile of 64, or a full and a half one of 32
    expected = run_with_grads(reference.recurrent_gated_delta_rule, inputs, h0)
    with pinned(getattr(chunk, name), config):
        actual = run_with_grads(chunk_gated_delta_rule, inputs, h0, place=guard.place, backend="triton", chunk_size=32)
    assert_all_close(actual, expected, FP32_TOL)


@pytest.mark.parametrize("K, warps", [(16, {8}), (32, {8}), (64, {4, 8}), (128, {4, 8})])
def test_wy_kernel_tunes_only_its_safe_warp_counts(K, warps, monkeypatch):
    """Offered every config at a real launch, the WY autotuner benchmarks 4 warps only from BK=64 (WY_FWD_CONFIGS:
    at K=16 those read shared memory out of bounds on the H100). Timing is faked: the CPU cannot time a kernel."""
    tuner = chunk._wy_fwd_kernel
    benched = []
    monkeypatch.setattr(tuner, "configs", tuner.all_configs)
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(tuner, "_bench", lambda *args, config, **kw: benched.append(config.num_warps) or [1.0])
    (q, k, v, g, beta), _ = make_inputs(1, 20, 1, 1, K, 16, init=False)
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, backend="triton")
    assert set(benched) == warps
    assert_rel_rmse(o, reference.recurrent_gated_delta_rule(q, k, v, g, beta)[0], 1e-5, "o")


def test_triton_chunk_without_final_state():
    (q, k, v, g, beta), _ = make_inputs(1, 40, 1, 1, 16, 16, init=False)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, scale=0.5, backend="triton")
    o_ref, _ = reference.recurrent_gated_delta_rule(q, k, v, g, beta, scale=0.5)
    assert ht is None
    assert_rel_rmse(o, o_ref, 1e-5, "o")


def test_triton_chunk_rejects_bad_shapes():
    (q, k, v, g, beta), _ = make_inputs(2, 8, 1, 3, 16, 16, init=False)
    with pytest.raises(ValueError):
        chunk_gated_delta_rule(q, k, v[:, :, :2], g, beta, backend="triton")
    with pytest.raises(ValueError):
        chunk_gated_delta_rule(q, k, v, g, beta, backend="triton", cu_seqlens=torch.tensor([0, 8, 16]))


@triton.jit
def _solve_kernel(A, Ai, BT: tl.constexpr):
    # (I + A)^{-1} of the program's [BT, BT] matrix, by the helper the WY kernel uses
    o = tl.arange(0, BT)
    p = tl.program_id(0) * BT * BT + o[:, None] * BT + o[None, :]
    tl.store(Ai + p, chunk._solve_unit_lower(tl.load(A + p), BT))


def _strictly_lower(kind, n, BT, device="cpu"):
    """n strictly lower [BT, BT] fp32 matrices. layer: the kernels' A, beta_i (k_i . k_j) exp(gc_i - gc_j) with unit
    keys; correlated: the same with near-parallel keys and beta near 1 (entries near 1); keys: k_i . k_j of
    unnormalized 8-dim keys (entries up to ~15, inverse entries up to ~1e21 at BT=64); negative: -0.9 everywhere
    (inverse entries 1.9^(i-j-1), ~1e17 at BT=64)."""
    gen = torch.Generator().manual_seed(BT)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    if kind == "negative":
        A = torch.full((n, BT, BT), -0.9, dtype=torch.float64)
    elif kind == "keys":
        k = randn(n, BT, 8)
        A = k @ k.mT
    else:
        shared = 3.0 * randn(n, 1, 32) if kind == "correlated" else 0.0
        k = F.normalize(shared + randn(n, BT, 32), dim=-1)
        beta = torch.sigmoid(randn(n, BT, 1) + (3.0 if kind == "correlated" else 0.0))
        gc = F.logsigmoid(randn(n, BT) + 2.0).cumsum(-1)
        A = beta * (k @ k.mT) * (gc[:, :, None] - gc[:, None, :]).clamp_max(0).exp()
    return A.tril(-1).float().to(device)


def _solve(A):
    """(I + A)^{-1} of each [BT, BT] matrix of A by `chunk._solve_unit_lower`; also checks that it is exactly unit lower
    triangular (zeros above the diagonal are what the backward relies on)."""
    BT = A.shape[-1]
    Ai = torch.empty_like(A)
    _solve_kernel[(A.shape[0],)](A, Ai, BT=BT)
    eye = torch.eye(BT, device=A.device)
    assert torch.equal(Ai.triu(), eye.expand_as(Ai)), "the inverse must be unit lower triangular"
    return Ai


def _fp64_inverse(A):
    eye = torch.eye(A.shape[-1], dtype=torch.float64, device=A.device)
    return torch.linalg.solve_triangular(eye + A.double(), eye.expand_as(A), upper=False)


def _inverse_tolerance(A: torch.Tensor, eps: float) -> torch.Tensor:
    """Relative-RMSE bound on a computed (I + A)^{-1} = X of a [BT, BT] unit lower triangular system in precision
    eps: BT * eps * || |X| |I + A| |X| ||_F / ||X||_F.

    Each entry of the inverse is formed by dot products of length < BT, rounded in eps, so it carries an error of
    at most gamma_BT |X| |I + A| |X| (Higham, forward error of triangular inversion, componentwise); the ratio is
    the componentwise (Skeel) condition number of the inverse. The normwise cond(I + A) would not do: at BT = 64 the
    `keys` and `negative` matrices have cond ~1e17, yet their inverses are accurate to ~1e-7, because their error
    follows the size of the entries. The bound holds for a substitution and for the block doubling alike (both form
    every entry from dot products of entries of X and A), with no machine-dependent constant."""
    T, X = torch.eye(A.shape[-1], dtype=torch.float64) + A.double(), _fp64_inverse(A)
    growth = (X.abs() @ T.abs() @ X.abs()).norm(dim=(-2, -1)) / X.norm(dim=(-2, -1))
    return A.shape[-1] * eps * growth


@pytest.mark.parametrize("BT", [16, 32, 64])
@pytest.mark.parametrize("kind", ["layer", "correlated", "keys", "negative"])
def test_solve_unit_lower_matches_fp64(kind, BT):
    """In fp32 (interpreted: exact fp32 matmuls) the block doubling is as accurate as a triangular inversion can be
    (`_inverse_tolerance`), also where the inverse's entries span many orders of magnitude."""
    A = _strictly_lower(kind, 8, BT)
    Ai, expected, tols = _solve(A), _fp64_inverse(A), _inverse_tolerance(A, 2.0**-24)
    assert tols.max() < 1e-2, "the bound must stay far below an O(1) error, or the test could not fail"
    for i in range(A.shape[0]):
        assert_rel_rmse(Ai[i], expected[i], tols[i].item(), f"matrix {i}")


def _step_inputs(B, HK, H, K, V, seed):
    (q, k, v, g, beta), h0 = make_inputs(B, 1, HK, H, K, V, seed=seed)
    return q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0


def test_triton_step_matches_reference_step():
    q, k, v, g, beta, h0 = _step_inputs(3, 2, 4, 32, 24, seed=0)
    state, state_ref = h0.clone(), h0.clone()
    o = gated_delta_step(q, k, v, g, beta, state, backend="triton")
    o_ref = reference.gated_delta_step(q, k, v, g, beta, state_ref)
    assert_rel_rmse(o, o_ref, 1e-6, "o")
    assert_rel_rmse(state, state_ref, 1e-6, "state")
    assert not torch.equal(state, h0), "the state must be updated in place"


def test_triton_step_reads_rows_of_wider_tensors():
    """The decoder hands the step views of its projections' outputs (q, k, v, g, beta side by side in one [B, N] row
    each): the kernel reads them through their batch strides, with the results of contiguous copies."""
    B, HK, H, K, V = 3, 2, 4, 16, 8
    inputs = _step_inputs(B, HK, H, K, V, seed=5)
    widths = [HK * K, HK * K, H * V, H, H]
    wide = torch.cat([x.reshape(B, -1) for x in inputs[:5]] + [torch.randn(B, 3)], -1)  # [B, N] with spare columns
    views = [part.view(x.shape) for part, x in zip(wide.split(widths + [3], -1), inputs[:5])]
    assert not any(view.is_contiguous() for view in views)
    state, state_copy = inputs[5].clone(), inputs[5].clone()
    o = gated_delta_step(*views, state, backend="triton")
    o_copy = gated_delta_step(*(view.contiguous() for view in views), state_copy, backend="triton")
    assert torch.equal(o, o_copy) and torch.equal(state, state_copy)


def test_triton_steps_equal_loop():
    (q, k, v, g, beta), h0 = make_inputs(2, 6, 1, 2, 16, 16)
    o_ref, ht_ref = reference.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    state = h0.clone()
    o = torch.stack([gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, backend="triton")
                     for t in range(6)], dim=1)
    assert_rel_rmse(o, o_ref, 1e-6, "o")
    assert_rel_rmse(state, ht_ref, 1e-6, "state")


def test_auto_backend_on_cpu_is_reference():
    (q, k, v, g, beta), h0 = make_inputs(1, 20, 1, 2, 16, 16)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_ref, ht_ref = reference.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert torch.equal(o, o_ref) and torch.equal(ht, ht_ref)
    q1, k1, v1, g1, b1, s = _step_inputs(2, 1, 2, 16, 16, seed=3)
    s_ref = s.clone()
    assert torch.equal(gated_delta_step(q1, k1, v1, g1, b1, s), reference.gated_delta_step(q1, k1, v1, g1, b1, s_ref))
    assert torch.equal(s, s_ref)


def test_bad_backend_raises():
    (q, k, v, g, beta), h0 = make_inputs(1, 4, 1, 1, 16, 16)
    with pytest.raises(ValueError):
        chunk_gated_delta_rule(q, k, v, g, beta, backend="cuda")
    with pytest.raises(ValueError):
        gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0, backend="fla")


# ---- GPU: the real shapes, bf16 inputs against the fp32 reference (run by hand on the H100) ----

GPU_CASES = [
    (2, 63, 4, 8, 64, 64, None, True),
    (2, 500, 4, 8, 128, 128, None, True),
    (1, 2048, 2, 4, 64, 64, None, False),
    (1, 2048, 4, 8, 128, 128, [0, 300, 1100, 2048], True),
    (4, 4096, 16, 16, 128, 128, None, False),  # the benchmark shape: autotuning may pick other configs here
]


@requires_cuda
@pytest.mark.parametrize("B, T, HK, H, K, V, cu, init", GPU_CASES)
def test_triton_chunk_bf16_cuda(B, T, HK, H, K, V, cu, init, guard):
    N = B if cu is None else len(cu) - 1
    inputs, h0 = make_inputs(B, T, HK, H, K, V, N=N, init=init, dtype=torch.bfloat16, device="cuda")
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    # The reference sees the same bf16-rounded inputs, upcast; the chunk form equals the loop (tested above).
    expected = run_with_grads(reference.chunk_gated_delta_rule, [x.float() for x in inputs], h0, cu_seqlens)
    actual = run_with_grads(chunk_gated_delta_rule, inputs, h0, cu_seqlens, place=guard.place)
    torch.cuda.synchronize()  # a faulting kernel fails this test, not a later one
    assert_all_close(actual, expected, BF16_TOL)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, T, HK, H, K, V, cu", STRONG_GATE_CASES + [(2, 1000, 4, 8, 128, 128, None)])
def test_triton_chunk_partial_chunk_strong_gates_cuda(B, T, HK, H, K, V, cu, dtype, guard):
    _check_strong_gates(B, T, HK, H, K, V, cu, dtype, "cuda", place=guard.place)
    torch.cuda.synchronize()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gate", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("B, T, HK, H, K, V, cu", [
    (2, 512, 4, 4, 64, 64, None),
    (1, 2048, 4, 4, 128, 128, None),
    (1, 2048, 2, 8, 128, 128, None),
    (1, 2048, 4, 8, 128, 128, [0, 300, 1100, 2048]),
])
def test_triton_chunk_long_half_precision_cuda(B, T, HK, H, K, V, cu, dtype, gate, guard):
    _check_long_half(B, T, HK, H, K, V, cu, dtype, gate, "cuda", place=guard.place)
    torch.cuda.synchronize()


@requires_cuda
@pytest.mark.parametrize("name, config, K", EVERY_CONFIG_CASES)
def test_triton_chunk_every_config_cuda(name, config, K, guard):
    """Each config that autotuning may pick, alone (the other kernels tune as usual), so that a config that faults
    or computes wrong values is named by the test id. T < BT and GQA: the shape of the first H100 fault. K=16: the
    WY kernel's m64n16 matmul with 4 warps read shared memory out of bounds there (so 4 warps only from BK=64)."""
    inputs, h0 = make_inputs(2, 63, 4, 8, K, K, dtype=torch.bfloat16, device="cuda")
    expected = run_with_grads(reference.chunk_gated_delta_rule, [x.float() for x in inputs], h0)
    with pinned(getattr(chunk, name), config):
        actual = run_with_grads(chunk_gated_delta_rule, inputs, h0, place=guard.place)
        torch.cuda.synchronize()
    assert_all_close(actual, expected, BF16_TOL)


@requires_cuda
@pytest.mark.parametrize("BT", [16, 32, 64])
@pytest.mark.parametrize("kind", ["layer", "correlated"])
def test_solve_unit_lower_tf32_cuda(kind, BT):
    """On the GPU the doubling matmuls run in tf32 (10-bit mantissa): on the A of real layers the inverse must stay
    within a few tf32 roundings, below the bf16 rounding (2^-9) it gets before w = Ai (beta exp(gc) k)."""
    A = _strictly_lower(kind, 8, BT, "cuda")
    assert_rel_rmse(_solve(A), _fp64_inverse(A), 2e-3, f"{kind} BT={BT}")


@requires_cuda
def test_triton_chunk_fp32_cuda_matches_loop():
    inputs, h0 = make_inputs(2, 200, 2, 4, 64, 64, device="cuda")
    expected = run_with_grads(reference.recurrent_gated_delta_rule, inputs, h0)
    actual = run_with_grads(chunk_gated_delta_rule, inputs, h0)
    # tl.dot on fp32 runs in tf32 on the GPU, which is finer than bf16
    assert_all_close(actual, expected, BF16_TOL)


@requires_cuda
@pytest.mark.parametrize("B, HK, H, D", [(1, 16, 16, 128), (64, 8, 16, 128), (7, 9, 9, 64)])
def test_triton_step_cuda(B, HK, H, D):
    q, k, v, g, beta, h0 = _step_inputs(B, HK, H, D, D, seed=5)
    q, k, v, g, beta, h0 = (x.cuda() for x in (q, k, v, g, beta, h0))
    state, state_ref = h0.clone(), h0.clone()
    o = gated_delta_step(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, state)
    o_ref = reference.gated_delta_step(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, state_ref)
    assert_rel_rmse(o, o_ref, 1e-2, "o")
    assert_rel_rmse(state, state_ref, 1e-5, "state")
