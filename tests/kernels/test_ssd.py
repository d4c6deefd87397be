"""Tests for the Mamba2 SSD op: reference chunked vs loop (fp64), Triton vs loop, decode step, backend switch.

The Triton tests run interpreted on CPU with small, awkward shapes; the @requires_cuda ones use big shapes and bf16.
Every comparison is against the fp64 reference on the same (rounded) inputs, within a bound derived from the
rounding of the kernels' casts and fp32 sums (`rounding_tolerances`).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rmse, rel_rmse, requires_cuda
from rounding import TF32, U, rounding_tolerances

from hybridize.kernels.ssd import chunk_ssd, recurrent_ssd, reference, ssd_step

GRADS = ("dq", "dk", "dv", "dg", "dh0")


def make_inputs(B, T, G, H, N, P, *, nseq=None, dtype=torch.float32, device="cpu", decay=1.0, seed=0):
    """q, k [B, T, G, N], v [B, T, H, P], g [B, T, H] (Mamba2-like, mostly weak decays), h0 [nseq, H, N, P]."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q, k, v = randn(B, T, G, N), randn(B, T, G, N), randn(B, T, H, P)
    g = F.logsigmoid(randn(B, T, H) + 2.0) * decay
    h0 = randn(B if nseq is None else nseq, H, N, P)
    g_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), g.to(device, g_dtype), h0.to(device, g_dtype)


def run(fn, q, k, v, g, h0, *, cu_seqlens=None, loss_on=("o", "ht"), seed=1, squared=False, **kwargs):
    """Forward, then backward of <o, do> + <ht, dht> with fixed random cotangents: o, ht and every gradient.

    squared: the cotangents' squares instead (see `squared_terms`)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g)]
    h0 = None if h0 is None else h0.detach().clone().requires_grad_()
    o, ht = fn(*leaves, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    # bf16-representable cotangents, so that bf16 and fp32 runs see the same values.
    do = torch.randn(o.shape, generator=gen).bfloat16().to(o)
    dht = torch.randn(ht.shape, generator=gen).bfloat16().to(ht)
    if squared:
        do, dht = do.square(), dht.square()
    loss = 0.0
    if "o" in loss_on:
        loss = loss + (o * do).sum()
    if "ht" in loss_on:
        loss = loss + (ht * dht).sum()
    inputs = leaves + ([] if h0 is None else [h0])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if d is None else d for x, d in zip(inputs, grads)]
    return dict(o=o, ht=ht, **dict(zip(GRADS, grads)))


def assert_all_close(actual, expected, tols):
    for name, tol in tols.items():
        if name in expected:
            assert_rel_rmse(actual[name], expected[name], tol, name)


# ---- Tolerances, from rounding (`rounding.rounding_tolerances`) ----
# Casts to the input dtype on the path of any one output or gradient: the stored h or dh, the decayed k, v or q that
# enters tl.dot, the chunk's attention tile (A or dA) and the output itself.
CASTS = 4


def _chunk_slices(T, chunk_size, cu_seqlens):
    """The [start, end) of every chunk along T: chunks restart at each packed sequence's start."""
    bounds = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    return [(c, min(c + chunk_size, eos)) for bos, eos in zip(bounds[:-1], bounds[1:])
            for c in range(bos, eos, chunk_size)]


def squared_terms(q, k, v, g, h0, *, scale=None, cu_seqlens=None, chunk_size=64, loss_on=("o", "ht")):
    """S2: for every element of o, ht and each gradient, the sum of the squares of the terms it is a sum of.

    Each is a sum of products of one entry of q, k, v or h0, one of do or dht (gradients), scale, and a decay
    exp(G_i - G_j): the fp64 reference fed their squares and 2g computes exactly these. For dg it adds the terms
    that the chunk-local form (README) sums and cancels: the reverse cumsum, within each chunk, of q_i . dq_i and
    k_i . dk_i (per head: q and k are expanded to every head first)."""
    B, T, G, N = q.shape
    H = v.shape[2]
    scale = N**-0.5 if scale is None else scale
    qh, kh = (x.double().repeat_interleave(H // G, 2).square() for x in (q, k))  # [B, T, H, N]
    s2 = run(reference.chunk_ssd, qh, kh, v.double().square(), 2 * g.double(),
             None if h0 is None else h0.double().square(), cu_seqlens=cu_seqlens, loss_on=loss_on, squared=True,
             scale=scale**2, chunk_size=chunk_size)
    per_token = (qh * s2["dq"] + kh * s2["dk"]).sum(-1)  # [B, T, H]
    cancelled = torch.cat([per_token[:, a:b].flip(1).cumsum(1).flip(1)
                           for a, b in _chunk_slices(T, chunk_size, cu_seqlens)], dim=1)
    s2["dg"] = s2["dg"] / 2 + cancelled  # d exp(2 G) / dg = 2 exp(2 G): half of it is the sum of squares
    s2["dq"], s2["dk"] = (s2[name].view(B, T, G, H // G, N).sum(3) for name in ("dq", "dk"))
    return s2


def max_chunk_log_decay(g, chunk_size, cu_seqlens=None) -> float:
    """max |G| of the chunk-local cumulative log decays, the largest value whose rounding enters a decay."""
    return max(g[:, a:b].double().cumsum(1).abs().max().item() for a, b in _chunk_slices(g.shape[1], chunk_size,
                                                                                         cu_seqlens))


def kernel_tolerances(q, k, v, g, h0, expected, *, chunk_size=64, cu_seqlens=None, scale=None, casts=CASTS,
                      u_in=None, loss_on=("o", "ht")):
    """`rounding_tolerances` of the Triton op with these inputs, against the fp64 reference on the same values: the
    chain is a dot along N or P, a chunk, and the state's chunk-to-chunk recursion. The decays exp(G_i - G_j) come
    from an fp32 cumsum G, off by u max|G| absolutely, which is each term's relative error (`max_chunk_log_decay`)."""
    B, T, G, N = q.shape
    longest = T if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    s2 = squared_terms(q, k, v, g, h0, scale=scale, cu_seqlens=cu_seqlens, chunk_size=chunk_size, loss_on=loss_on)
    return rounding_tolerances(
        expected, s2, casts=casts, u_in=U[q.dtype] if u_in is None else u_in, u_acc=U[torch.float32],
        chain=N + v.shape[3] + chunk_size + -(-longest // chunk_size),
        term_error=max_chunk_log_decay(g, chunk_size, cu_seqlens),
    )


def fp64(*tensors):
    return [None if x is None else x.double() for x in tensors]


# 1. The chunked reference is the token loop, in fp64.
def _fp64_tolerances(inputs, expected, chunk_size, cu_seqlens=None):
    """Both forms in fp64, no casts: the loop's chain is the sequence, the chunked form's a chunk, a dot, the chunks."""
    q, _, v, g, _ = inputs
    s2 = squared_terms(*inputs, cu_seqlens=cu_seqlens, chunk_size=chunk_size)
    chain = 2 * q.shape[1] + q.shape[3] + v.shape[3] + chunk_size
    return rounding_tolerances(expected, s2, casts=0, u_in=0.0, u_acc=U[torch.float64], chain=chain,
                               term_error=max_chunk_log_decay(g, chunk_size, cu_seqlens))


@pytest.mark.parametrize("T", [1, 63, 75, 200])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_reference_chunk_matches_loop_fp64(T, chunk_size):
    inputs = make_inputs(2, T, 2, 4, 8, 12, dtype=torch.float64)
    expected = run(reference.recurrent_ssd, *inputs)
    actual = run(reference.chunk_ssd, *inputs, chunk_size=chunk_size)
    assert_all_close(actual, expected, _fp64_tolerances(inputs, expected, chunk_size))


def test_reference_chunk_matches_loop_fp64_varlen():
    cu_seqlens = torch.tensor([0, 5, 70, 140])
    inputs = make_inputs(1, 140, 1, 2, 8, 12, nseq=3, dtype=torch.float64)
    expected = run(reference.recurrent_ssd, *inputs, cu_seqlens=cu_seqlens)
    actual = run(reference.chunk_ssd, *inputs, cu_seqlens=cu_seqlens, chunk_size=32)
    assert_all_close(actual, expected, _fp64_tolerances(inputs, expected, 32, cu_seqlens))


# 2. Triton (interpreted) against the token loop in fp64 on the same values, within `kernel_tolerances`.
@pytest.mark.parametrize(
    "B, T, G, H, N, P, chunk_size, use_h0",
    [
        (2, 1, 1, 2, 16, 16, 64, True),
        (2, 63, 2, 4, 32, 16, 64, False),
        (1, 75, 2, 2, 20, 24, 64, True),  # N, P not powers of two; a partial second chunk
        (1, 200, 1, 2, 16, 16, 32, True),  # seven chunks
        (1, 40, 1, 2, 80, 72, 16, True),  # N, P over one 64-wide block
    ],
)
def test_triton_matches_loop(B, T, G, H, N, P, chunk_size, use_h0):
    q, k, v, g, h0 = make_inputs(B, T, G, H, N, P)
    h0 = h0 if use_h0 else None
    expected = run(recurrent_ssd, *fp64(q, k, v, g, h0))
    actual = run(chunk_ssd, q, k, v, g, h0, chunk_size=chunk_size, backend="triton")
    assert_all_close(actual, expected, kernel_tolerances(q, k, v, g, h0, expected, chunk_size=chunk_size))


@pytest.mark.parametrize("use_h0", [True, False])
def test_triton_matches_loop_varlen(use_h0):
    # Three sequences: shorter than a chunk, just over one, and two partial chunks' worth.
    cu_seqlens = torch.tensor([0, 17, 83, 150], dtype=torch.int32)
    q, k, v, g, h0 = make_inputs(1, 150, 2, 4, 16, 32, nseq=3)
    h0 = h0 if use_h0 else None
    expected = run(recurrent_ssd, *fp64(q, k, v, g, h0), cu_seqlens=cu_seqlens)
    actual = run(chunk_ssd, q, k, v, g, h0, cu_seqlens=cu_seqlens, backend="triton")
    assert_all_close(actual, expected, kernel_tolerances(q, k, v, g, h0, expected, cu_seqlens=cu_seqlens))


@pytest.mark.parametrize("loss_on", [("o",), ("ht",)])
def test_triton_one_output_unused(loss_on):
    """An unused output reaches backward as None (no dht, or no do); the gradients must still be right."""
    inputs = make_inputs(1, 75, 1, 2, 16, 16)
    expected = run(recurrent_ssd, *fp64(*inputs), loss_on=loss_on)
    actual = run(chunk_ssd, *inputs, loss_on=loss_on, backend="triton")
    tols = kernel_tolerances(*inputs, expected, loss_on=loss_on)
    if "o" not in loss_on:
        tols["dq"] = 0.0  # q does not reach the final state: exactly zero
    assert_all_close(actual, expected, tols)


def test_triton_initial_state_without_grad():
    """An initial state that needs no gradient skips dh0; the other gradients must not change."""
    q, k, v, g, h0 = make_inputs(1, 75, 1, 2, 16, 16)
    expected = run(recurrent_ssd, *fp64(q, k, v, g, h0), loss_on=("o",))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    o, _ = chunk_ssd(*leaves, initial_state=h0, backend="triton")
    o.backward(torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).bfloat16().float())  # run()'s do
    actual = dict(o=o, **{name: x.grad for name, x in zip(GRADS, leaves)})
    tols = kernel_tolerances(q, k, v, g, h0, expected, loss_on=("o",))
    assert_all_close(actual, expected, {name: tols[name] for name in ("o", "dq", "dk", "dv", "dg")})


def test_triton_strong_decay():
    """Strong decays: the partial last chunk's cumsum falls far below -88, where unmasked exp(g_i - g_j) overflows."""
    inputs = make_inputs(1, 120, 1, 2, 16, 16, decay=15.0)
    assert inputs[3][0, 64:].sum(0).max() < -88
    expected = run(recurrent_ssd, *fp64(*inputs), loss_on=("o",))
    actual = run(chunk_ssd, *inputs, loss_on=("o",), backend="triton")
    assert_all_close(actual, expected, kernel_tolerances(*inputs, expected, loss_on=("o",)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype):
    """16-bit inputs take their casts as on the GPU (h and dh stored in the input dtype, tl.dot operands)."""
    q, k, v, g, h0 = make_inputs(1, 150, 2, 4, 32, 16, dtype=dtype)
    expected = run(recurrent_ssd, *fp64(q, k, v, g, h0))
    actual = run(chunk_ssd, q, k, v, g, h0, backend="triton")
    assert actual["o"].dtype == dtype and actual["ht"].dtype == torch.float32
    assert_all_close(actual, expected, kernel_tolerances(q, k, v, g, h0, expected))


# 2b. The Mamba2 mapping, against the minimal discrete SSD of the Mamba2 paper written from its equations.
def _segsum(a: torch.Tensor) -> torch.Tensor:
    """a [..., T] -> [..., T, T] with [i, j] = a_{j+1} + ... + a_i for i >= j (0 on the diagonal), -inf above it.

    Summed along the masked rows rather than as a difference of two cumulative sums, which would cancel."""
    T = a.shape[-1]
    x = a[..., None, :].expand(*a.shape, T).transpose(-1, -2)  # [..., i, r] = a_i
    x = x.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(-1), 0.0)  # keep r < i: [..., i, r] = a_i
    s = x.cumsum(-2)  # [..., i, r] = a_{r+1} + ... + a_i for i > r
    return s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))


def _minimal_discrete_ssd(x, dt, A, B, C, D, chunk: int = 16):
    """Mamba2's discrete SSM h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = C_t^T h_t + D x_t, computed the way
    the paper's minimal SSD does (state-space duality, block decomposition with segsums): x [b, T, H, P], dt [b, T, H],
    A [H], B, C [b, T, G, N], D [H]. Returns y and the final state [b, H, N, P]. fp32."""
    b, T, H, P = x.shape
    pad = -T % chunk
    rep = H // B.shape[2]
    X = F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad))  # [b, L, H, P]
    Ad = F.pad(A * dt, (0, 0, 0, pad))  # [b, L, H]; padding decays nothing and writes nothing
    Bh, Ch = (F.pad(m.repeat_interleave(rep, 2), (0, 0, 0, 0, 0, pad)) for m in (B, C))  # [b, L, H, N]
    n = X.shape[1] // chunk
    X, Ad, Bh, Ch = (m.reshape(b, n, chunk, *m.shape[2:]) for m in (X, Ad, Bh, Ch))
    Ad = Ad.permute(0, 3, 1, 2)  # [b, H, n, l]
    Acs = Ad.cumsum(-1)
    # diagonal blocks: y_i = sum_{j <= i} exp(segsum)_ij (C_i . B_j) X_j
    Y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, _segsum(Ad).exp(), X)
    # the state each chunk leaves, then the states entering every chunk, by the segsum over chunk totals
    states = torch.einsum("bclhn,bhcl,bclhp->bchnp", Bh, (Acs[..., -1:] - Acs).exp(), X)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)  # [b, n + 1, H, N, P]
    decay = _segsum(F.pad(Acs[..., -1], (1, 0))).exp()  # [b, H, n + 1, n + 1]
    states = torch.einsum("bhzc,bchnp->bzhnp", decay, states)
    Y = Y + torch.einsum("bclhn,bchnp,bhcl->bclhp", Ch, states[:, :-1], Acs.exp())
    y = Y.reshape(b, n * chunk, H, P)[:, :T] + D[:, None] * x
    return y, states[:, -1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [75, 130])
def test_mamba2_mapping_matches_minimal_discrete_ssd(T, dtype):
    """q = C, k = B, v = x * dt, g = A * dt and scale = 1, plus the D skip: the documented mapping (README) gives the
    minimal discrete SSD of 16-bit inputs within their rounding. The op's default scale N^-1/2 is not Mamba2's."""
    gen = torch.Generator().manual_seed(3)
    b, G, H, N, P = 2, 2, 4, 16, 32
    x = torch.randn(b, T, H, P, generator=gen).to(dtype).float()
    B, C = (torch.randn(b, T, G, N, generator=gen).to(dtype).float() for _ in range(2))
    dt = F.softplus(torch.randn(b, T, H, generator=gen) - 1.0)
    A, D = -torch.exp(torch.randn(H, generator=gen)), torch.randn(H, generator=gen)
    y_ref, state_ref = _minimal_discrete_ssd(x, dt, A, B, C, D)
    # the chunked minimal form is the token recurrence (fp32, no rounding in between)
    y_loop, state_loop = recurrent_ssd(C, B, x * dt[..., None], A * dt, scale=1.0, output_final_state=True)
    # y's terms: the SSD's and D x. Chains: the loop's over T, the minimal form's over its chunks and their segsums,
    # whose log decays reach the sequence's total (and the kernel's, shorter)
    s2 = squared_terms(C, B, x * dt[..., None], A * dt, None, scale=1.0)
    s2 = {"y": s2["o"] + (D[:, None] * x).double().square(), "state": s2["ht"]}
    expected = {"y": y_ref, "state": state_ref}
    bound = dict(s2=s2, u_acc=U[torch.float32], chain=2 * T + N + P + 64, term_error=max_chunk_log_decay(A * dt, T))
    tols = rounding_tolerances(expected, casts=0, u_in=0.0, **bound)
    assert_rel_rmse(y_loop + D[:, None] * x, y_ref, tols["y"], "minimal form vs loop")
    assert_rel_rmse(state_loop, state_ref, tols["state"], "minimal form vs loop, state")

    v = (x * dt[..., None]).to(dtype)
    y, state = chunk_ssd(C.to(dtype), B.to(dtype), v, A * dt, scale=1.0, output_final_state=True, backend="triton")
    # v's own rounding, then the kernels' casts
    tols = rounding_tolerances(expected, casts=CASTS + 1, u_in=U[dtype], **bound)
    assert_rel_rmse(y.float() + D[:, None] * x, y_ref, tols["y"], "y")
    assert_rel_rmse(state, state_ref, tols["state"], "state")
    y_default, _ = chunk_ssd(C.to(dtype), B.to(dtype), v, A * dt, backend="triton")
    assert rel_rmse(y_default.float() + D[:, None] * x, y_ref) > 0.1, "the default scale must not pass for Mamba2's"


# 3. Decode step.
def step_tolerances(q, k, v, g, state, expected, *, scale=None, u_in):
    """`rounding_tolerances` of a decode step from `state`, against the fp64 reference: one decay (exp of g, off by
    u |g|) and one write per state entry, then a dot along N and the cast of o to v's dtype."""
    N = q.shape[-1]
    scale = N**-0.5 if scale is None else scale
    s2_state = state.double().square()
    o2 = reference.ssd_step(*(x.double().square() for x in (q, k, v)), 2 * g.double(), s2_state, scale=scale**2)
    s2 = {"o": o2, "state": s2_state}
    return rounding_tolerances(expected, s2, casts=1, u_in=u_in, u_acc=U[torch.float32], chain=2 + N,
                               term_error=g.abs().max().item())


@pytest.mark.parametrize("G, H, N, P", [(2, 4, 20, 40), (1, 3, 16, 128)])
def test_triton_step_matches_reference(G, H, N, P):
    q, k, v, g, _ = make_inputs(3, 1, G, H, N, P)
    inputs = q[:, 0], k[:, 0], v[:, 0], g[:, 0]
    state0 = torch.randn(3, H, N, P, generator=torch.Generator().manual_seed(2))
    state, state_ref = state0.clone(), state0.double()
    o = ssd_step(*inputs, state, scale=0.3, backend="triton")
    o_ref = reference.ssd_step(*fp64(*inputs), state_ref, scale=0.3)
    tols = step_tolerances(*inputs, state0, dict(o=o_ref, state=state_ref), scale=0.3, u_in=U[v.dtype])
    assert_rel_rmse(o, o_ref, tols["o"], "o")
    assert_rel_rmse(state, state_ref, tols["state"], "state")


def test_triton_step_reads_rows_of_wider_tensors():
    """The decoder hands the step views of its projections' outputs (C, B, x dt, g side by side in one [B, N] row
    each): the kernel reads them through their batch strides, with the results of contiguous copies."""
    q, k, v, g, _ = make_inputs(3, 1, 2, 4, 16, 8)
    inputs = [x[:, 0] for x in (q, k, v, g)]
    wide = torch.cat([x.reshape(3, -1) for x in inputs] + [torch.randn(3, 5)], -1)  # [B, N] with spare columns
    views = [part.view(x.shape) for part, x in zip(wide.split([x[0].numel() for x in inputs] + [5], -1), inputs)]
    assert not any(view.is_contiguous() for view in views)
    state = torch.randn(3, 4, 16, 8, generator=torch.Generator().manual_seed(3))
    state_copy = state.clone()
    o = ssd_step(*views, state, backend="triton")
    o_copy = ssd_step(*(view.contiguous() for view in views), state_copy, backend="triton")
    assert torch.equal(o, o_copy) and torch.equal(state, state_copy)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_step_loop_matches_recurrent(backend):
    q, k, v, g, h0 = make_inputs(2, 20, 2, 4, 16, 24)
    o_ref, ht_ref = recurrent_ssd(*fp64(q, k, v, g), initial_state=h0.double(), output_final_state=True)
    state = h0.clone()
    o = torch.stack([ssd_step(q[:, t], k[:, t], v[:, t], g[:, t], state, backend=backend) for t in range(20)], dim=1)
    s2 = squared_terms(q, k, v, g, h0)
    tols = rounding_tolerances(dict(o=o_ref, state=ht_ref), dict(o=s2["o"], state=s2["ht"]), casts=1,
                               u_in=U[v.dtype], u_acc=U[torch.float32], chain=2 * 20 + 16,
                               term_error=max_chunk_log_decay(g, 20))
    assert_rel_rmse(o, o_ref, tols["o"], "o")
    assert_rel_rmse(state, ht_ref, tols["state"], "state")


# 4. Backend switch and argument checks.
def test_auto_backend_on_cpu_is_reference():
    q, k, v, g, h0 = make_inputs(1, 30, 1, 2, 16, 16)
    o, ht = chunk_ssd(q, k, v, g, initial_state=h0, output_final_state=True)
    o_ref, ht_ref = reference.chunk_ssd(q, k, v, g, initial_state=h0, output_final_state=True)
    assert torch.equal(o, o_ref) and torch.equal(ht, ht_ref)
    state, state_ref = h0.clone(), h0.clone()
    assert torch.equal(ssd_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state),
                       reference.ssd_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state_ref))
    assert torch.equal(state, state_ref)


def test_bad_arguments_raise():
    q, k, v, g, h0 = make_inputs(1, 30, 1, 2, 16, 16)
    with pytest.raises(ValueError, match="backend"):
        chunk_ssd(q, k, v, g, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        ssd_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], h0.clone(), backend="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_ssd(q, k, v, g, chunk_size=48, backend="triton")
    with pytest.raises(ValueError, match="shapes"):
        chunk_ssd(q, k, v[:, :, :1].expand(-1, -1, 3, -1), g, backend="triton")
    with pytest.raises(ValueError, match="state"):
        ssd_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], h0.double(), backend="triton")


# 5. Big shapes, bf16 inputs, on the GPU, against the fp64 reference on the same values (test 1 ties its chunked
# form to the loop), within `kernel_tolerances`.
@requires_cuda
@pytest.mark.parametrize("T", [63, 500, 2048])
@pytest.mark.parametrize("N, P", [(64, 64), (128, 64), (64, 128), (128, 128)])
@pytest.mark.parametrize("G, H", [(4, 4), (2, 8)])
def test_cuda_bf16_matches_reference(T, N, P, G, H):
    q, k, v, g, h0 = make_inputs(2, T, G, H, N, P, dtype=torch.bfloat16, device="cuda")
    expected = run(reference.chunk_ssd, *fp64(q, k, v, g, h0))
    actual = run(chunk_ssd, q, k, v, g, h0)
    assert_all_close(actual, expected, kernel_tolerances(q, k, v, g, h0, expected))


@requires_cuda
@pytest.mark.parametrize("use_h0", [True, False])
def test_cuda_bf16_varlen(use_h0):
    cu_seqlens = torch.tensor([0, 1, 300, 363, 2048, 2100], dtype=torch.int32, device="cuda")
    q, k, v, g, h0 = make_inputs(1, 2100, 2, 8, 128, 64, nseq=5, dtype=torch.bfloat16, device="cuda")
    h0 = h0 if use_h0 else None
    expected = run(reference.chunk_ssd, *fp64(q, k, v, g, h0), cu_seqlens=cu_seqlens)
    actual = run(chunk_ssd, q, k, v, g, h0, cu_seqlens=cu_seqlens)
    assert_all_close(actual, expected, kernel_tolerances(q, k, v, g, h0, expected, cu_seqlens=cu_seqlens))


@requires_cuda
def test_cuda_fp32_matches_loop():
    """fp32 on the GPU: tl.dot rounds both of its operands to tf32 there, so twice the casts, each of tf32's u."""
    inputs = make_inputs(2, 500, 2, 4, 64, 64, device="cuda")
    expected = run(recurrent_ssd, *fp64(*inputs))
    actual = run(chunk_ssd, *inputs)
    assert_all_close(actual, expected, kernel_tolerances(*inputs, expected, casts=2 * CASTS, u_in=TF32))


@requires_cuda
@pytest.mark.parametrize("N, P", [(64, 64), (128, 64), (128, 128)])
def test_cuda_step_matches_reference(N, P):
    q, k, v, g, _ = make_inputs(64, 1, 8, 32, N, P, dtype=torch.bfloat16, device="cuda")
    inputs = q[:, 0], k[:, 0], v[:, 0], g[:, 0]
    state0 = torch.randn(64, 32, N, P, device="cuda")
    state, state_ref = state0.clone(), state0.double()
    o = ssd_step(*inputs, state)
    o_ref = reference.ssd_step(*fp64(*inputs), state_ref)
    tols = step_tolerances(*inputs, state0, dict(o=o_ref, state=state_ref), u_in=U[v.dtype])
    assert_rel_rmse(o.float(), o_ref, tols["o"], "o")
    assert_rel_rmse(state, state_ref, tols["state"], "state")
