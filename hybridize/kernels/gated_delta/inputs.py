"""The op's raw inputs, formed inside it: the gate and beta from the projections, and L2-normalized q and k (Triton).

The gate g = -exp(A_log) softplus(a + dt_bias) and beta = sigmoid(b + b_bias) are elementwise per (token, head), so
the kernels that read g and beta form them where they load them (`gate_inputs`, `decay_gate`): the WY kernels of
chunk.py, forward and backward, and the decode step. The L2 norm of q and k is a reduction over K that every chunk
kernel reading q or k would repeat, so it runs once, as a forward prologue (`l2norm_fwd`: normalized q, k and their
rstd) and a backward epilogue (`l2norm_bwd`: the shared heads' gradients summed over their value heads, then the
norm's Jacobian). The math is in README.md ("Raw inputs").
"""

import torch
import triton
import triton.language as tl

from hybridize.kernels.gated_delta.reference import L2NORM_EPS


@triton.jit
def softplus(x):
    """log(1 + e^x), x itself above 20 (as torch's softplus). log1p by Kahan's trick, log(u) e / (u - 1) with u = 1 + e
    rounded: accurate to a few ulps where log(1 + e) keeps only the bits of e above 1's (layers run at e ~ 1e-3)."""
    e = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + e
    d = u - 1.0  # 0 where e is below 1's last bit: log1p(e) = e there
    return tl.where(x > 20.0, x, tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d))))


@triton.jit
def decay_gate(a, A_log, dt_bias):
    """g = -exp(A_log) softplus(a + dt_bias) and its slope dg/da = -exp(A_log) sigmoid(a + dt_bias), in fp32."""
    x = a.to(tl.float32) + dt_bias
    rate = -tl.exp(A_log)
    return rate * softplus(x), rate * tl.sigmoid(x)


@triton.jit
def log_decay(g, A_log, dt_bias, o_g, m, i_h, RAW_GATES: tl.constexpr):
    """Head i_h's log decay [BT] at offsets o_g of g, fp32, 0 where m is false: g as given, or at RAW_GATES formed
    from the raw a that g then holds."""
    b_g = tl.load(g + o_g, mask=m, other=0.0).to(tl.float32)
    if RAW_GATES:
        b_g, _ = decay_gate(b_g, tl.load(A_log + i_h).to(tl.float32), tl.load(dt_bias + i_h).to(tl.float32))
        b_g = tl.where(m, b_g, 0.0)  # the padded rows must stay 0: the cumulative gate reads them
    return b_g


@triton.jit
def write_strength(beta, b_bias, o_b, m, i_h, RAW_GATES: tl.constexpr):
    """Head i_h's beta [BT] at offsets o_b of beta, fp32, 0 where m is false: as given, or at RAW_GATES
    sigmoid(b + b_bias) of the raw b that beta then holds."""
    b_b = tl.load(beta + o_b, mask=m, other=0.0).to(tl.float32)
    if RAW_GATES:
        b_b = tl.where(m, tl.sigmoid(b_b + tl.load(b_bias + i_h).to(tl.float32)), 0.0)
    return b_b


@triton.jit
def _l2norm_rows_fwd(x, s_x, y, rstd, o_r, m_r, eps, HK: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    # rows r = token * HK + head: x at token stride s_x, y contiguous [R, K]
    o_k = tl.arange(0, BK)
    m = m_r[:, None] & (o_k < K)[None, :]
    p_x = x + ((o_r // HK).to(tl.int64) * s_x + (o_r % HK) * K)[:, None] + o_k[None, :]
    b_x = tl.load(p_x, mask=m, other=0.0).to(tl.float32)  # [BR, BK]
    b_rstd = tl.rsqrt(tl.sum(b_x * b_x, 1) + eps)  # [BR]
    tl.store(y + o_r.to(tl.int64)[:, None] * K + o_k[None, :], (b_x * b_rstd[:, None]).to(y.dtype.element_ty), mask=m)
    tl.store(rstd + o_r, b_rstd, mask=m_r)


@triton.jit
def _l2norm_fwd_kernel(
    q, s_q, k, s_k, qn, kn, rstd_q, rstd_k, R, eps,
    HK: tl.constexpr, K: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    m_r = o_r < R
    _l2norm_rows_fwd(q, s_q, qn, rstd_q, o_r, m_r, eps, HK, K, BK)
    _l2norm_rows_fwd(k, s_k, kn, rstd_k, o_r, m_r, eps, HK, K, BK)


@triton.jit
def _l2norm_rows_bwd(dy, y, rstd, dx, o_r, m_r, G: tl.constexpr, K: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    # dy per value head [R * G, K] (value head hk * G + j of a token is row r * G + j), y and dx [R, K]
    o_k = tl.arange(0, BK)
    m = m_r[:, None] & (o_k < K)[None, :]
    o_rk = o_r.to(tl.int64)[:, None] * K + o_k[None, :]
    b_dy = tl.zeros([BR, BK], dtype=tl.float32)
    for j in tl.static_range(G):
        b_dy += tl.load(dy + (o_r.to(tl.int64) * G + j)[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    b_y = tl.load(y + o_rk, mask=m, other=0.0).to(tl.float32)
    b_rstd = tl.load(rstd + o_r, mask=m_r, other=0.0)
    # y = x rstd, rstd = (|x|^2 + eps)^-1/2  =>  dx = rstd (dy - y (y . dy))
    b_dx = b_rstd[:, None] * (b_dy - b_y * tl.sum(b_y * b_dy, 1)[:, None])
    tl.store(dx + o_rk, b_dx.to(dx.dtype.element_ty), mask=m)


@triton.jit
def _l2norm_bwd_kernel(
    dqn, dkn, qn, kn, rstd_q, rstd_k, dq, dk, R,
    G: tl.constexpr, K: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    m_r = o_r < R
    _l2norm_rows_bwd(dqn, qn, rstd_q, dq, o_r, m_r, G, K, BR, BK)
    _l2norm_rows_bwd(dkn, kn, rstd_k, dk, o_r, m_r, G, K, BR, BK)


def token_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [B, T, *inner] as [B * T, *inner] rows at one token stride, each row contiguous, and that stride: a view where
    x is laid out so (the split views `project` returns are), else a copy."""
    rows = x.flatten(0, 1)
    if rows.shape[0] and not rows[0].is_contiguous():
        rows = rows.contiguous()
    return rows, rows.stride(0)


def _row_block(K: int) -> tuple[int, int]:
    """Rows per program and the K tile: ~4K elements a tile, enough bytes in flight for a memory-bound pass."""
    BK = triton.next_power_of_2(K)
    return max(1, 4096 // BK), BK


def l2norm_fwd(q: torch.Tensor, k: torch.Tensor):
    """q, k [B, T, HK, K] (any token stride) -> q / |q|, k / |k| contiguous in their dtype, and rstd [B, T, HK] fp32."""
    B, T, HK, K = q.shape
    (q_rows, s_q), (k_rows, s_k) = token_rows(q), token_rows(k)
    qn, kn = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(2))
    rstd_q, rstd_k = (torch.empty(B, T, HK, dtype=torch.float32, device=q.device) for _ in range(2))
    R = B * T * HK
    BR, BK = _row_block(K)
    _l2norm_fwd_kernel[(triton.cdiv(R, BR),)](
        q_rows, s_q, k_rows, s_k, qn, kn, rstd_q, rstd_k, R, L2NORM_EPS, HK=HK, K=K, BR=BR, BK=BK, num_warps=4
    )
    return qn, kn, rstd_q, rstd_k


def l2norm_bwd(dqn, dkn, qn, kn, rstd_q, rstd_k):
    """Gradients of the normalized q, k per value head [B, T, H, K] -> those of the raw q, k [B, T, HK, K] (qn's dtype):
    each shared head's gradient summed over its H // HK value heads, then through the norm."""
    B, T, HK, K = qn.shape
    dq, dk = (torch.empty(qn.shape, dtype=qn.dtype, device=qn.device) for _ in range(2))
    R = B * T * HK
    BR, BK = _row_block(K)
    _l2norm_bwd_kernel[(triton.cdiv(R, BR),)](
        dqn, dkn, qn, kn, rstd_q, rstd_k, dq, dk, R, G=dqn.shape[2] // HK, K=K, BR=BR, BK=BK, num_warps=4
    )
    return dq, dk
