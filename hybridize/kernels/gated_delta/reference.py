"""Gated delta rule in PyTorch: the token loop (ground truth), the chunkwise WY/UT form, and the decode step.

All three compute in fp32 (fp64 when given fp64) and are differentiable by autograd. The math is in README.md. Each
takes the raw inputs too (`gate_params`, `qk_l2norm`): the gate, beta and the q/k norms are then formed first, in
the compute dtype, and autograd carries the gradients back to the raw inputs and parameters.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from hybridize.kernels.conv1d.reference import causal_conv1d_step
from hybridize.kernels.norm.reference import gated_rms_norm

L2NORM_EPS = 1e-6  # inside the rsqrt


class GateParams(NamedTuple):
    """The per-head parameters ([H] each) that turn the raw a, b into g = -exp(A_log) softplus(a + dt_bias) and
    beta = sigmoid(b + b_bias) inside the op."""

    A_log: torch.Tensor
    dt_bias: torch.Tensor
    b_bias: torch.Tensor


def check_gate_params(params: GateParams | None, H: int) -> None:
    if params is not None and any(p.shape != (H,) for p in params):
        raise ValueError(f"gate params must be [{H}] each, got {[tuple(p.shape) for p in params]}")


def _raw_inputs(q, k, g, beta, gate_params, qk_l2norm, dt):
    """q, k, g, beta in the compute dtype dt, the gate, beta and the q/k norms formed from the raw inputs if asked."""
    q, k, g, beta = q.to(dt), k.to(dt), g.to(dt), beta.to(dt)
    if qk_l2norm:
        q, k = (x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2NORM_EPS) for x in (q, k))
    if gate_params is not None:
        A_log, dt_bias, b_bias = (p.to(dt) for p in gate_params)
        g = -A_log.exp() * F.softplus(g + dt_bias)
        beta = torch.sigmoid(beta + b_bias)
    return q, k, g, beta


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _sequences(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence: the B rows, or the N packed sequences of row 0."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    if B != 1:
        raise ValueError(f"cu_seqlens needs batch size 1, got {B}")
    bounds = cu_seqlens.tolist()
    return [(0, bos, eos) for bos, eos in zip(bounds[:-1], bounds[1:])]


def _prepare(q, k, v, g, beta, scale, initial_state, cu_seqlens, gate_params, qk_l2norm):
    """Upcast (forming the raw inputs), share q/k heads across their value-head group, split the batch in sequences."""
    B, T, HK, K = q.shape
    H = v.shape[2]
    if H % HK:
        raise ValueError(f"value heads {H} must be a multiple of q/k heads {HK}")
    check_gate_params(gate_params, H)
    dt = _compute_dtype(q)
    q, k, g, beta = _raw_inputs(q, k, g, beta, gate_params, qk_l2norm, dt)
    q, k = (x.repeat_interleave(H // HK, dim=2) for x in (q, k))  # [B, T, H, K]
    v = v.to(dt)
    scale = K**-0.5 if scale is None else scale
    seqs = _sequences(B, T, cu_seqlens)
    if initial_state is not None and initial_state.shape[0] != len(seqs):
        raise ValueError(f"initial_state has {initial_state.shape[0]} states for {len(seqs)} sequences")
    return q, k, v, g, beta, scale, seqs, dt


def _finish(outs, states, out_dtype, cu_seqlens, output_final_state):
    o = torch.stack(outs) if cu_seqlens is None else torch.cat(outs)[None]  # [B, T, H, V]
    ht = torch.stack(states) if output_final_state else None  # [N, H, K, V] fp32 (fp64 in fp64 mode)
    return o.to(out_dtype), ht


def _initial(initial_state, n, H, K, V, dt, device):
    if initial_state is None:
        return torch.zeros(H, K, V, dtype=dt, device=device)
    return initial_state[n].to(dt)


def recurrent_gated_delta_rule(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, gate_params=None,
    qk_l2norm=False,
):
    """Token-by-token gated delta rule, the ground truth.

    Args:
        q, k: [B, T, HK, K]; v: [B, T, H, V] with H a multiple of HK (value head h reads q/k head h // (H // HK)).
        g: [B, T, H] log decay (<= 0); beta: [B, T, H] write strength.
        scale: output scale, default K ** -0.5.
        initial_state: [N, H, K, V] or None. output_final_state: also return the final states.
        cu_seqlens: [N + 1] cumulative sequence starts of N sequences packed in a batch of 1, or None (N = B).
        gate_params: GateParams(A_log, dt_bias, b_bias), each [H]: g and beta are then the raw a and b of
            g = -exp(A_log) softplus(a + dt_bias) and beta = sigmoid(b + b_bias).
        qk_l2norm: q and k are raw; they are used as q / sqrt(|q|^2 + 1e-6), k / sqrt(|k|^2 + 1e-6).
    Returns:
        o: [B, T, H, V] in v's dtype; final_state: [N, H, K, V] fp32, or None.
    """
    V, out_dtype = v.shape[-1], v.dtype  # v is upcast below
    K = q.shape[-1]
    q, k, v, g, beta, scale, seqs, dt = _prepare(
        q, k, v, g, beta, scale, initial_state, cu_seqlens, gate_params, qk_l2norm
    )
    H = v.shape[2]
    outs, states = [], []
    for n, (b, bos, eos) in enumerate(seqs):
        S = _initial(initial_state, n, H, K, V, dt, q.device)  # [H, K, V]
        o_n = []
        for t in range(bos, eos):
            S = S * g[b, t].exp()[:, None, None]
            delta = beta[b, t, :, None] * (v[b, t] - torch.einsum("hkv,hk->hv", S, k[b, t]))  # [H, V]
            S = S + k[b, t, :, :, None] * delta[:, None, :]
            o_n.append(scale * torch.einsum("hkv,hk->hv", S, q[b, t]))
        outs.append(torch.stack(o_n) if o_n else v.new_zeros(0, H, V))
        states.append(S)
    return _finish(outs, states, out_dtype, cu_seqlens, output_final_state)


def unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I + A)^{-1} for strictly lower-triangular A [..., C, C], row by row (forward substitution)."""
    C = A.shape[-1]
    eye = torch.eye(C, dtype=A.dtype, device=A.device)
    rows = [eye[0].expand(*A.shape[:-2], C)]
    for i in range(1, C):
        # row i of T = (I + A)^{-1}: e_i - sum_{j<i} A_ij T_j
        prev = torch.stack(rows, dim=-2)  # [..., i, C]
        rows.append(eye[i] - (A[..., i : i + 1, :i] @ prev).squeeze(-2))
    return torch.stack(rows, dim=-2)


def _decay_matrix(gc: torch.Tensor, diagonal: int) -> torch.Tensor:
    """exp(gc_i - gc_j) on and below `diagonal`, 0 above (masked before exp so nothing overflows)."""
    C = gc.shape[-1]
    mask = torch.ones(C, C, dtype=torch.bool, device=gc.device).tril(diagonal)
    diff = gc[..., :, None] - gc[..., None, :]
    return torch.where(mask, diff.masked_fill(~mask, 0).exp(), torch.zeros_like(diff))


def _chunk_rows(q, k, v, g, beta, S, scale, C):
    """N sequences of one length at once: q, k [N, T, H, K]; v [N, T, H, V]; g, beta [N, T, H]; S [N, H, K, V].
    Returns o [N, T, H, V] and S. Batched over the rows, so the substitution's C - 1 steps run once for all."""
    T = q.shape[1]
    NC = -(-T // C)
    pad = NC * C - T
    # Zero-padded tokens (k = v = beta = g = 0) leave the state unchanged and are dropped from o.
    q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    q, k, v = (x.unflatten(1, (NC, C)).permute(0, 3, 1, 2, 4) for x in (q, k, v))  # [N, H, NC, C, D]
    g, beta = (x.unflatten(1, (NC, C)).permute(0, 3, 1, 2) for x in (g, beta))  # [N, H, NC, C]

    gc = g.cumsum(-1)  # [N, H, NC, C] log decay from the chunk start
    A = beta[..., None] * (k @ k.transpose(-1, -2)) * _decay_matrix(gc, -1)  # [N, H, NC, C, C] strictly lower
    Tm = unit_lower_inverse(A)  # (I + A)^{-1}
    w = Tm @ (k * (beta * gc.exp())[..., None])  # [N, H, NC, C, K]
    u = Tm @ (v * beta[..., None])  # [N, H, NC, C, V]
    attn = (q @ k.transpose(-1, -2)) * _decay_matrix(gc, 0)  # [N, H, NC, C, C] causal, diagonal included

    outs = []
    for c in range(NC):
        v_new = u[:, :, c] - w[:, :, c] @ S  # [N, H, C, V] what the chunk writes, given the state at its start
        outs.append(scale * (gc[:, :, c, :, None].exp() * (q[:, :, c] @ S) + attn[:, :, c] @ v_new))
        g_last = gc[:, :, c, -1]  # [N, H]
        k_decay = k[:, :, c] * (g_last[..., None] - gc[:, :, c]).exp()[..., None]  # [N, H, C, K]
        S = g_last.exp()[..., None, None] * S + k_decay.transpose(-1, -2) @ v_new
    o = torch.cat(outs, dim=2)[:, :, :T].transpose(1, 2)  # [N, T, H, V]
    return o, S


def chunk_gated_delta_rule(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=64,
    gate_params=None, qk_l2norm=False,
):
    """Chunkwise (WY/UT) gated delta rule in PyTorch; same arguments and results as `recurrent_gated_delta_rule`."""
    V, out_dtype = v.shape[-1], v.dtype  # v is upcast below
    K = q.shape[-1]
    q, k, v, g, beta, scale, seqs, dt = _prepare(
        q, k, v, g, beta, scale, initial_state, cu_seqlens, gate_params, qk_l2norm
    )
    H = v.shape[2]
    if cu_seqlens is None:  # equal lengths: every row in one batched pass
        S = q.new_zeros(len(seqs), H, K, V) if initial_state is None else initial_state.to(dt)  # [B, H, K, V]
        o, S = _chunk_rows(q, k, v, g, beta, S, scale, chunk_size)
        return o.to(out_dtype), (S if output_final_state else None)
    outs, states = [], []
    for n, (b, bos, eos) in enumerate(seqs):
        S = _initial(initial_state, n, H, K, V, dt, q.device)[None]
        sl = slice(bos, eos)
        o_n, S = _chunk_rows(q[b : b + 1, sl], k[b : b + 1, sl], v[b : b + 1, sl], g[b : b + 1, sl],
                             beta[b : b + 1, sl], S, scale, chunk_size)
        outs.append(o_n[0])
        states.append(S[0])
    return _finish(outs, states, out_dtype, cu_seqlens, output_final_state)


def gated_delta_step(q, k, v, g, beta, state, *, scale=None, gate_params=None, qk_l2norm=False):
    """One decode token. q, k: [B, HK, K]; v: [B, H, V]; g, beta: [B, H]; state: [B, H, K, V] fp32, updated in place.

    gate_params, qk_l2norm: the raw inputs, as in `recurrent_gated_delta_rule`. Returns o: [B, H, V] in v's dtype.
    """
    H, HK = v.shape[1], q.shape[1]
    check_gate_params(gate_params, H)
    dt = _compute_dtype(state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, g, beta = _raw_inputs(q, k, g, beta, gate_params, qk_l2norm, dt)
    q, k = (x.repeat_interleave(H // HK, dim=1) for x in (q, k))  # [B, H, K]
    S = state.to(dt) * g.exp()[..., None, None]
    delta = beta[..., None] * (v.to(dt) - torch.einsum("bhkv,bhk->bhv", S, k))  # [B, H, V]
    S = S + k[..., None] * delta[..., None, :]
    state.copy_(S)
    return (scale * torch.einsum("bhkv,bhk->bhv", S, q)).to(v.dtype)


def gated_delta_layer_step(qkv, a, b, gate, conv_weight, conv_state, state, gate_params, norm_weight, *, k_heads,
                           scale=None, norm_eps=1e-6):
    """A Gated DeltaNet layer's decode step from its raw projections, as the kernel in layer_step.py computes it: the
    conv step, the delta step and the gated norm one after another, in fp32 throughout (the kernel keeps its
    intermediates in fp32 too). conv_state and state are updated in place; returns o [B, H V] in qkv's dtype."""
    B, H, K, V = state.shape
    dt = _compute_dtype(state)
    y = causal_conv1d_step(qkv.to(dt), conv_weight, None, conv_state=conv_state, activation="silu")
    q, k, v = y.split([k_heads * K, k_heads * K, H * V], dim=-1)
    o = gated_delta_step(q.view(B, k_heads, K), k.view(B, k_heads, K), v.view(B, H, V), a, b, state, scale=scale,
                         gate_params=gate_params, qk_l2norm=True)  # [B, H, V]
    o = gated_rms_norm(o, gate.reshape(B, H, V).to(dt), norm_weight, eps=norm_eps)
    return o.reshape(B, H * V).to(qkv.dtype)
