"""Causal depthwise short convolution in Triton: tiled forward, final state and fused backward, under autograd."""

import torch
import triton
import triton.language as tl

from hybridize.kernels.varlen import chunk_layout, chunk_span, sequence_span

from .reference import check_conv_args

# Forward: one [BT, BD] output tile per program. Backward: each program walks NS tiles of BT rows, so that the
# weight/bias gradients are summed in registers and only one partial per (BT*NS rows, BD channels) is written.
# 8-16 fp32 values per thread per tile: the backward holds about sixteen tiles at once (sm_90, W=4, SiLU:
# ~170 registers, no spills).
FWD_BT, FWD_BD, FWD_WARPS = 32, 128, 8
BWD_BT, BWD_BD, BWD_NS, BWD_WARPS = 8, 128, 32, 4


@triton.jit
def _state_ptr(h, i_n, D, W: tl.constexpr, PRESENT: tl.constexpr):
    """Sequence i_n's [D, W-1] block of a state tensor, or None when the state is absent."""
    if PRESENT:
        h = h + i_n * D * (W - 1)
    return h


@triton.jit
def _load_rows(p_x, p_h, s0, T, o_d, m_d, D, R: tl.constexpr, W: tl.constexpr, USE_INITIAL_STATE: tl.constexpr):
    """fp32 [R, BD] inputs at positions s0 .. s0+R-1: x for 0 <= s < T, h0[:, s+W-1] for -(W-1) <= s < 0, else 0."""
    o_s = s0 + tl.arange(0, R)
    m_x = (o_s >= 0) & (o_s < T)
    b_x = tl.load(p_x + o_s[:, None] * D + o_d[None, :], mask=m_x[:, None] & m_d[None, :], other=0.).to(tl.float32)
    if USE_INITIAL_STATE:
        # only the first rows of a sequence reach into the initial state
        if s0 < 0:
            # column by column: a [BD] load broadcast over rows needs far fewer registers than a [R, BD] gather
            for i_c in tl.static_range(W - 1):
                b_hc = tl.load(p_h + o_d * (W - 1) + i_c, mask=m_d, other=0.).to(tl.float32)
                b_x += tl.where((o_s == i_c - W + 1)[:, None], b_hc[None, :], 0.)
    return b_x


@triton.jit
def _tap(w, o_d, m_d, i_w: tl.constexpr, W: tl.constexpr):
    """Tap i_w of the weight zero-padded on the left to width 4 (tap 3 multiplies x_t), as fp32 [1, BD]."""
    b_w = tl.load(w + o_d * W + (i_w - 4 + W), mask=m_d & (i_w >= 4 - W), other=0.)
    return b_w.to(tl.float32)[None, :]


@triton.jit
def _silu_grad(b_dy, b_z):
    b_s = tl.sigmoid(b_z)
    return b_dy * b_s * (1 + b_z * (1 - b_s))


@triton.jit
def _conv_bwd_rows(p_x, p_h, p_dy, s0, T, b_w0, b_w1, b_w2, b_w3, b_b, o_d, m_d, D,
                   R: tl.constexpr, W: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, USE_SILU: tl.constexpr):
    """dx at the R rows from s0: dx_s = sum_i w_i dz_{s+3-i}, dz = dy * act'(z), z recomputed from x.

    Also returns, for the weight gradient, dz_s and the inputs x_{s-3} .. x_s it multiplies.
    """
    b_xm3 = _load_rows(p_x, p_h, s0 - 3, T, o_d, m_d, D, R, W, USE_INITIAL_STATE)
    b_xm2 = _load_rows(p_x, p_h, s0 - 2, T, o_d, m_d, D, R, W, USE_INITIAL_STATE)
    b_xm1 = _load_rows(p_x, p_h, s0 - 1, T, o_d, m_d, D, R, W, USE_INITIAL_STATE)
    b_x0 = _load_rows(p_x, p_h, s0, T, o_d, m_d, D, R, W, USE_INITIAL_STATE)
    # dy is zero outside [0, T), so are the dz built from it
    b_dz0 = _load_rows(p_dy, p_h, s0, T, o_d, m_d, D, R, W, False)
    b_dz1 = _load_rows(p_dy, p_h, s0 + 1, T, o_d, m_d, D, R, W, False)
    b_dz2 = _load_rows(p_dy, p_h, s0 + 2, T, o_d, m_d, D, R, W, False)
    b_dz3 = _load_rows(p_dy, p_h, s0 + 3, T, o_d, m_d, D, R, W, False)
    if USE_SILU:
        # z at rows s .. s+3 needs the inputs at offsets -3 .. +3, each loaded once
        b_xp1 = _load_rows(p_x, p_h, s0 + 1, T, o_d, m_d, D, R, W, USE_INITIAL_STATE)
        b_xp2 = _load_rows(p_x, p_h, s0 + 2, T, o_d, m_d, D, R, W, USE_INITIAL_STATE)
        b_xp3 = _load_rows(p_x, p_h, s0 + 3, T, o_d, m_d, D, R, W, USE_INITIAL_STATE)
        b_dz0 = _silu_grad(b_dz0, b_b + b_w0 * b_xm3 + b_w1 * b_xm2 + b_w2 * b_xm1 + b_w3 * b_x0)
        b_dz1 = _silu_grad(b_dz1, b_b + b_w0 * b_xm2 + b_w1 * b_xm1 + b_w2 * b_x0 + b_w3 * b_xp1)
        b_dz2 = _silu_grad(b_dz2, b_b + b_w0 * b_xm1 + b_w1 * b_x0 + b_w2 * b_xp1 + b_w3 * b_xp2)
        b_dz3 = _silu_grad(b_dz3, b_b + b_w0 * b_x0 + b_w1 * b_xp1 + b_w2 * b_xp2 + b_w3 * b_xp3)
    b_dx = b_w3 * b_dz0 + b_w2 * b_dz1 + b_w1 * b_dz2 + b_w0 * b_dz3
    return b_dx, b_dz0, b_xm3, b_xm2, b_xm1, b_x0


@triton.jit
def causal_conv1d_fwd_kernel(
    x, w, b, h0, y, cu_seqlens, chunk_indices, T, D,
    W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, USE_SILU: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_d, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_t, bos, T, _ = chunk_span(cu_seqlens, chunk_indices, i_b, i_t, T, BT, IS_VARLEN)
    p_x, p_h = x + bos * D, _state_ptr(h0, i_n, D, W, USE_INITIAL_STATE)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D

    # z_t = bias + sum_i w_i x_{t-3+i}, over the taps of the zero-padded weight that are not padding
    b_y = tl.zeros([BT, BD], dtype=tl.float32)
    for i_w in tl.static_range(4 - W, 4):
        b_xi = _load_rows(p_x, p_h, i_t * BT - 3 + i_w, T, o_d, m_d, D, BT, W, USE_INITIAL_STATE)
        b_y += _tap(w, o_d, m_d, i_w, W) * b_xi
    if HAS_BIAS:
        b_y += tl.load(b + o_d, mask=m_d, other=0.).to(tl.float32)[None, :]
    if USE_SILU:
        b_y = b_y * tl.sigmoid(b_y)
    p_y = y + bos * D + o_t[:, None] * D + o_d[None, :]
    tl.store(p_y, b_y.to(y.dtype.element_ty), mask=(o_t < T)[:, None] & m_d[None, :])


@triton.jit
def causal_conv1d_final_state_kernel(
    x, h0, ht, cu_seqlens, T, D,
    W: tl.constexpr, BD: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_d, i_n = tl.program_id(0), tl.program_id(1)
    bos, T = sequence_span(cu_seqlens, i_n, T, IS_VARLEN)
    o_w = tl.arange(0, 4)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D

    # column j holds the input at position T-W+1+j, which is the initial state's tail when T < W-1
    p_h = _state_ptr(h0, i_n, D, W, USE_INITIAL_STATE)
    b_ht = _load_rows(x + bos * D, p_h, T - (W - 1), T, o_d, m_d, D, 4, W, USE_INITIAL_STATE)
    p_ht = ht + i_n * D * (W - 1) + o_d[None, :] * (W - 1) + o_w[:, None]
    tl.store(p_ht, b_ht.to(ht.dtype.element_ty), mask=(o_w < W - 1)[:, None] & m_d[None, :])


@triton.jit
def causal_conv1d_bwd_kernel(
    x, w, b, h0, dy, dht, dx, dw, db, dh0, cu_seqlens, chunk_indices, T, D,
    W: tl.constexpr, BT: tl.constexpr, NS: tl.constexpr, BD: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRAD: tl.constexpr,
    USE_SILU: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_d, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # index of this program's row of the weight/bias gradient partials: a row of length 0 still has one program
    if IS_VARLEN:
        i_cg = i_c
    else:
        i_cg = i_b * tl.num_programs(1) + i_c
    i_n, i_c, bos, T, _ = chunk_span(cu_seqlens, chunk_indices, i_b, i_c, T, BT * NS, IS_VARLEN)
    p_x, p_dy, p_h = x + bos * D, dy + bos * D, _state_ptr(h0, i_n, D, W, USE_INITIAL_STATE)
    p_dht = _state_ptr(dht, i_n, D, W, USE_FINAL_STATE_GRAD)
    o_d = i_d * BD + tl.arange(0, BD)
    o_w = tl.arange(0, 4)
    m_d = o_d < D
    b_w0, b_w1, b_w2, b_w3 = _tap(w, o_d, m_d, 0, W), _tap(w, o_d, m_d, 1, W), _tap(w, o_d, m_d, 2, W), \
        _tap(w, o_d, m_d, 3, W)
    if HAS_BIAS:
        b_b = tl.load(b + o_d, mask=m_d, other=0.).to(tl.float32)[None, :]
    else:
        b_b = tl.zeros([1, BD], dtype=tl.float32)

    # dw[:, i] = sum_t dz_t * x_{t-3+i} (padded taps), db = sum_t dz_t, over this program's rows; summed
    # elementwise in the loop and over rows once at the end, which keeps cross-thread reductions out of the loop
    b_dw0 = tl.zeros([BT, BD], dtype=tl.float32)
    b_dw1 = tl.zeros([BT, BD], dtype=tl.float32)
    b_dw2 = tl.zeros([BT, BD], dtype=tl.float32)
    b_dw3 = tl.zeros([BT, BD], dtype=tl.float32)
    b_db = tl.zeros([BT, BD], dtype=tl.float32)
    for i_s in range(NS):
        s0 = (i_c * NS + i_s) * BT
        o_t = s0 + tl.arange(0, BT)
        m_t = o_t < T
        b_dx, b_dz, b_xm3, b_xm2, b_xm1, b_x0 = _conv_bwd_rows(
            p_x, p_h, p_dy, s0, T, b_w0, b_w1, b_w2, b_w3, b_b, o_d, m_d, D, BT, W, USE_INITIAL_STATE, USE_SILU)
        if USE_FINAL_STATE_GRAD:
            # the final state's column j is x_{T-W+1+j}, so only the last rows of a sequence get its gradient
            if s0 + BT > T - (W - 1):
                for i_j in tl.static_range(W - 1):
                    b_dhtj = tl.load(p_dht + o_d * (W - 1) + i_j, mask=m_d, other=0.).to(tl.float32)
                    b_dx += tl.where((o_t == T - (W - 1) + i_j)[:, None], b_dhtj[None, :], 0.)
        p_dx = dx + bos * D + o_t[:, None] * D + o_d[None, :]
        tl.store(p_dx, b_dx.to(dx.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])

        b_dw0 += b_dz * b_xm3
        b_dw1 += b_dz * b_xm2
        b_dw2 += b_dz * b_xm1
        b_dw3 += b_dz * b_x0
        b_db += b_dz
    # padded tap i is column i-4+W of dw; the padding taps are dropped
    p_dw = dw + i_cg * D * W + o_d * W - 4 + W
    tl.store(p_dw + 0, tl.sum(b_dw0, 0), mask=m_d & (W >= 4))
    tl.store(p_dw + 1, tl.sum(b_dw1, 0), mask=m_d & (W >= 3))
    tl.store(p_dw + 2, tl.sum(b_dw2, 0), mask=m_d & (W >= 2))
    tl.store(p_dw + 3, tl.sum(b_dw3, 0), mask=m_d)
    if HAS_BIAS:
        tl.store(db + i_cg * D + o_d, tl.sum(b_db, 0), mask=m_d)

    # the initial state's column c sits at position c-W+1, so it takes the dx formula there
    if USE_INITIAL_STATE:
        if i_c == 0:
            # [0], not `b_dh0, _, ...`: `_` holds an int above, and a branch may not give it another type
            b_dh0 = _conv_bwd_rows(
                p_x, p_h, p_dy, 1 - W, T, b_w0, b_w1, b_w2, b_w3, b_b, o_d, m_d, D, 4, W, USE_INITIAL_STATE, USE_SILU)[0]
            if USE_FINAL_STATE_GRAD:
                # when T < W-1 the final state's column j is the initial state's column T+j
                o_j = o_w - T
                p_dhts = p_dht + o_d[None, :] * (W - 1) + o_j[:, None]
                m_j = (o_j >= 0) & (o_w < W - 1)
                b_dh0 += tl.load(p_dhts, mask=m_j[:, None] & m_d[None, :], other=0.).to(tl.float32)
            p_dh0 = dh0 + i_n * D * (W - 1) + o_d[None, :] * (W - 1) + o_w[:, None]
            tl.store(p_dh0, b_dh0.to(dh0.dtype.element_ty), mask=(o_w < W - 1)[:, None] & m_d[None, :])


def causal_conv1d_final_state(x, initial_state, cu_seqlens, W: int) -> torch.Tensor:
    """The last W-1 inputs of every sequence, [N, D, W-1], oldest first, in x's dtype."""
    B, T, D = x.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    ht = torch.empty(N, D, W - 1, dtype=x.dtype, device=x.device)
    if W == 1:
        return ht
    BD = min(128, triton.next_power_of_2(D))
    # an absent state is passed as x, never read: _state_ptr returning None fails to compile on Triton 3.6
    causal_conv1d_final_state_kernel[(triton.cdiv(D, BD), N)](
        x, x if initial_state is None else initial_state, ht, cu_seqlens, T, D,
        W=W, BD=BD, USE_INITIAL_STATE=initial_state is not None, IS_VARLEN=cu_seqlens is not None,
    )
    return ht


def causal_conv1d_fwd(x, weight, bias, activation, initial_state, output_final_state, cu_seqlens):
    B, T, D = x.shape
    W = weight.shape[1]
    # every sequence gets a program, also an empty one
    lay = chunk_layout(B, T, FWD_BT, cu_seqlens, x.device, min_chunks=1)
    BD = min(FWD_BD, triton.next_power_of_2(D))
    y = torch.empty_like(x)
    causal_conv1d_fwd_kernel[(triton.cdiv(D, BD), lay.NT, B)](
        x, weight, bias, x if initial_state is None else initial_state, y, lay.cu_seqlens, lay.chunk_indices, T, D,
        W=W, BT=FWD_BT, BD=BD,
        HAS_BIAS=bias is not None, USE_INITIAL_STATE=initial_state is not None,
        USE_SILU=activation == "silu", IS_VARLEN=cu_seqlens is not None,
        num_warps=FWD_WARPS,
    )
    final_state = causal_conv1d_final_state(x, initial_state, cu_seqlens, W) if output_final_state else None
    return y, final_state


def causal_conv1d_bwd(x, weight, bias, activation, initial_state, cu_seqlens, dy, dht):
    B, T, D = x.shape
    W = weight.shape[1]
    # fewer sub-tiles per program when the sequences are short, so that few rows are masked-out work
    max_len = T if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    NS = max(1, min(BWD_NS, triton.cdiv(max_len, BWD_BT)))
    # every sequence gets a program, also an empty one: it writes the initial state's gradient
    lay = chunk_layout(B, T, BWD_BT * NS, cu_seqlens, x.device, min_chunks=1)
    NC = lay.NT
    BD = min(BWD_BD, triton.next_power_of_2(D))
    dx = torch.empty_like(x)
    # fp32 partials of the weight/bias gradients, one row per program along T, summed below
    dw = torch.empty(B * NC, D, W, dtype=torch.float32, device=x.device)
    db = torch.empty(B * NC, D, dtype=torch.float32, device=x.device) if bias is not None else None
    dh0 = torch.empty_like(initial_state) if initial_state is not None else None
    causal_conv1d_bwd_kernel[(triton.cdiv(D, BD), NC, B)](
        x, weight, bias, x if initial_state is None else initial_state, dy, dy if dht is None else dht, dx, dw, db, dh0,
        lay.cu_seqlens, lay.chunk_indices, T, D,
        W=W, BT=BWD_BT, NS=NS, BD=BD,
        HAS_BIAS=bias is not None, USE_INITIAL_STATE=initial_state is not None and W > 1,
        USE_FINAL_STATE_GRAD=dht is not None and W > 1, USE_SILU=activation == "silu",
        IS_VARLEN=cu_seqlens is not None,
        num_warps=BWD_WARPS,
    )
    dw = dw.sum(0).to(weight.dtype)
    db = db.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw, db, dh0


class CausalConv1dFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, activation, output_final_state, cu_seqlens):
        y, final_state = causal_conv1d_fwd(x, weight, bias, activation, initial_state, output_final_state, cu_seqlens)
        ctx.save_for_backward(x, weight, bias, initial_state, cu_seqlens)
        ctx.activation = activation
        # an unused output keeps a None gradient instead of a tensor of zeros
        ctx.set_materialize_grads(False)
        return y, final_state

    @staticmethod
    def backward(ctx, dy, dht):
        x, weight, bias, initial_state, cu_seqlens = ctx.saved_tensors
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        dht = None if dht is None else dht.contiguous()
        dx, dw, db, dh0 = causal_conv1d_bwd(x, weight, bias, ctx.activation, initial_state, cu_seqlens, dy, dht)
        return dx, dw, db, dh0, None, None, None


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise convolution of width W <= 4 over T, with optional SiLU; see conv1d/README.md.

    Args:
        x: [B, T, D] input; with `cu_seqlens`, B = 1 and N sequences are packed along T.
        weight: [D, W] taps, weight[:, W-1] multiplies the current input.
        bias: [D] or None.
        activation: None or "silu".
        initial_state: [N, D, W-1] inputs before each sequence start, oldest first (zeros if None).
        output_final_state: also return the last W-1 inputs of each sequence.
        cu_seqlens: [N+1] int32/int64 cumulative sequence starts, or None (then N = B).
    Returns:
        y: [B, T, D] in x's dtype; final_state: [N, D, W-1] in x's dtype, or None.
    """
    check_conv_args(x, weight, activation, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=x.device).contiguous()
    return CausalConv1dFunction.apply(
        x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
        None if initial_state is None else initial_state.contiguous(),
        activation, output_final_state, cu_seqlens,
    )
