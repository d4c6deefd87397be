"""Plain-PyTorch Mamba2 SSD: the token-by-token loop (ground truth), the chunked form, and the decode step.

All three compute in fp32 (fp64 when given fp64), are differentiable by autograd, and take the
layout of the Triton kernels: q, k [B, T, G, N], v [B, T, H, P], g [B, T, H], states [Nseq, H, N, P].
The math is in README.md.
"""

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from hybridize.kernels.conv1d.reference import causal_conv1d_step
from hybridize.kernels.norm.reference import gated_rms_norm

# fn(q, k, v, g, h0, scale) -> (o, ht) on one batch of equal-length sequences, heads already expanded.
_SequenceFn = Callable[..., Tuple[torch.Tensor, torch.Tensor]]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _expand_groups(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat each of the G groups for its H // G heads (head h reads group h // (H // G))."""
    return x.repeat_interleave(num_heads // x.shape[-2], dim=-2)


def _run_sequences(
    fn: _SequenceFn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: Optional[float],
    initial_state: Optional[torch.Tensor],
    output_final_state: bool,
    cu_seqlens: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Upcast, expand groups, and run `fn` on the whole batch, or on each packed sequence when varlen."""
    B, T, H, P = v.shape
    N = q.shape[-1]
    if H % q.shape[2] != 0 or k.shape != q.shape:
        raise ValueError(f"q, k {tuple(q.shape)}, {tuple(k.shape)} do not fit v {tuple(v.shape)}")
    scale = N**-0.5 if scale is None else scale
    dtype = _compute_dtype(q)
    q, k = _expand_groups(q, H).to(dtype), _expand_groups(k, H).to(dtype)
    v32, g = v.to(dtype), g.to(dtype)
    h0 = None if initial_state is None else initial_state.to(dtype)
    if cu_seqlens is None:
        if h0 is None:
            h0 = q.new_zeros(B, H, N, P)
        o, ht = fn(q, k, v32, g, h0, scale)
    else:
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch size 1, got {B}")
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for i, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            h0_i = q.new_zeros(1, H, N, P) if h0 is None else h0[i : i + 1]
            o_i, ht_i = fn(q[:, bos:eos], k[:, bos:eos], v32[:, bos:eos], g[:, bos:eos], h0_i, scale)
            outs.append(o_i)
            states.append(ht_i)
        o, ht = torch.cat(outs, dim=1), torch.cat(states, dim=0)
    return o.to(v.dtype), (ht if output_final_state else None)


def _recurrent(q, k, v, g, h, scale):
    """S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t, one token at a time."""
    outs = []
    for t in range(q.shape[1]):
        h = h * g[:, t, :, None, None].exp() + k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, N, P]
        outs.append(torch.einsum("bhn,bhnp->bhp", q[:, t], h) * scale)
    return torch.stack(outs, dim=1), h


def _chunked(q, k, v, g, h, scale, chunk_size):
    """Intra-chunk (Q K^T * decay mask) V plus the inter-chunk term Q h, passing h from chunk to chunk."""
    B, T, H, N = q.shape
    C = chunk_size
    NT = -(-T // C)
    pad = NT * C - T
    # Zero padding is inert: k = v = 0 adds nothing to the state and g = 0 decays nothing.
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)).view(B, NT, C, H, -1) for x in (q, k, v))
    gc = F.pad(g, (0, 0, 0, pad)).view(B, NT, C, H).cumsum(dim=2)  # [B, NT, C, H]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()[:, :, None]  # [C, C, 1]
    log_decay = (gc[:, :, :, None] - gc[:, :, None, :]).masked_fill(~causal, float("-inf"))  # [B, NT, C, C, H]
    A = torch.einsum("bcihn,bcjhn->bcijh", q, k) * log_decay.exp() * scale
    o = torch.einsum("bcijh,bcjhp->bcihp", A, v)  # [B, NT, C, H, P]
    inter = []
    for c in range(NT):
        g_c, g_last = gc[:, c], gc[:, c, -1]  # [B, C, H], [B, H]
        inter.append(torch.einsum("bihn,bhnp->bihp", q[:, c] * g_c[..., None].exp(), h) * scale)
        k_decayed = k[:, c] * (g_last[:, None] - g_c)[..., None].exp()  # [B, C, H, N]
        h = h * g_last[..., None, None].exp() + torch.einsum("bjhn,bjhp->bhnp", k_decayed, v[:, c])
    o = o + torch.stack(inter, dim=1)
    return o.reshape(B, NT * C, H, -1)[:, :T], h


def recurrent_ssd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token-by-token SSD, the ground truth. Same arguments and returns as `chunk_ssd`."""
    return _run_sequences(_recurrent, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def chunk_ssd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Chunked SSD in PyTorch.

    Args:
        q, k: [B, T, G, N]; head h reads group h // (H // G).
        v: [B, T, H, P].
        g: [B, T, H] log decay (<= 0).
        scale: defaults to N ** -0.5.
        initial_state: [Nseq, H, N, P] or None (zeros).
        output_final_state: also return the state after the last token.
        cu_seqlens: [Nseq + 1] packed-sequence starts (then B == 1), or None (Nseq = B).
        chunk_size: tokens per chunk.
    Returns:
        o [B, T, H, P] in v's dtype, and the final state [Nseq, H, N, P] (fp32, fp64 for fp64 inputs) or None.
    """

    def fn(q, k, v, g, h0, scale):
        return _chunked(q, k, v, g, h0, scale, chunk_size)

    return _run_sequences(fn, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def ssd_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """One decode token: state <- exp(g) state + k v^T (in place), o = scale * state^T q.

    Args:
        q, k: [B, G, N]; v: [B, H, P]; g: [B, H]; state: [B, H, N, P] fp32, updated in place.
    Returns:
        o [B, H, P] in v's dtype.
    """
    H, N = v.shape[1], q.shape[-1]
    scale = N**-0.5 if scale is None else scale
    q, k = _expand_groups(q, H).to(state.dtype), _expand_groups(k, H).to(state.dtype)
    state.mul_(g.to(state.dtype).exp()[..., None, None]).add_(k[..., :, None] * v.to(state.dtype)[..., None, :])
    return (torch.einsum("bhn,bhnp->bhp", q, state) * scale).to(v.dtype)


def ssd_layer_step(xbc, dt, z, conv_weight, conv_bias, conv_state, state, A_log, dt_bias, D, norm_weight, *, groups,
                   scale=None, norm_eps=1e-6):
    """A Mamba2 layer's decode step from its raw projections, as the kernel in layer_step.py computes it: the conv
    step, dt and the decay, the SSD step, the D skip and the gated norm one after another, in fp32 throughout (the
    kernel keeps its intermediates in fp32 too). conv_state and state are updated in place; returns o [B, H P] in
    xbc's dtype."""
    B, H, N, P = state.shape
    dtype = torch.float64 if state.dtype == torch.float64 else torch.float32
    y = causal_conv1d_step(xbc.to(dtype), conv_weight, conv_bias, conv_state=conv_state, activation="silu")
    x, b, c = y.split([H * P, groups * N, groups * N], dim=-1)
    x = x.view(B, H, P)
    step = F.softplus(dt.to(dtype) + dt_bias.to(dtype))  # [B, H]
    decay = -torch.exp(A_log.to(dtype)) * step
    o = ssd_step(c.view(B, groups, N), b.view(B, groups, N), x * step[..., None], decay, state, scale=scale)
    o = o + D.to(dtype)[:, None] * x  # [B, H, P]
    o = gated_rms_norm(o, z.reshape(B, H, P).to(dtype), norm_weight, eps=norm_eps)
    return o.reshape(B, H * P).to(xbc.dtype)
