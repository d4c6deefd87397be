"""The divergence, CE and logit gradient per row in Triton: one program a row, passes over the vocabulary in blocks.

Pass 1 keeps running maxima and sums (online softmax) of the student's and the teacher's tempered logits, and of the
student's at temperature 1 when the temperature is not 1, so the forward and reverse KL and the CE come out of one
read of both rows. The JSD needs both normalisations before its mixture, so it takes a second pass. The last pass,
only for training, writes the gradient over the student's row. Nothing of size [n, V] is allocated.
"""

import torch
import triton
import triton.language as tl

from .reference import DIVERGENCES

# a block of the vocabulary per loop step; 8 warps hold 16 values of each block tensor a thread
BLOCK_V, NUM_WARPS = 4096, 8
# the running maxima start here instead of -inf, so a block of masked lanes gives exp(-inf - FLOOR) = 0, not NaN
FLOOR = tl.constexpr(-1.0e30)


@triton.jit
def _online(m, l, a, x, w):
    """Running max m, sum l of exp(x - m) and sum a of exp(x - m) w after the block x [BV] (masked lanes -inf, their w
    0)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    rescale = tl.exp(m - m_new)
    e = tl.exp(x - m_new)  # [BV], 0 on masked lanes
    return m_new, l * rescale + tl.sum(e, 0), a * rescale + tl.sum(e * w, 0)


@triton.jit
def _log_probabilities(s_row, t_row, o_v, V, inv_tau, lse_s, lse_t):
    """Columns o_v [BV] of both rows once lse(s') and lse(t') are known: (mask, s, log q, log p), fp32."""
    m_v = o_v < V
    b_s = tl.load(s_row + o_v, mask=m_v, other=0.).to(tl.float32)
    b_t = tl.load(t_row + o_v, mask=m_v, other=0.).to(tl.float32)
    return m_v, b_s, b_s * inv_tau - lse_s, b_t * inv_tau - lse_t


@triton.jit
def _log_mixture(log_p, log_q, log_beta, log_1m_beta):
    """log(beta p + (1 - beta) q) from log p and log q [BV], without overflow."""
    a = log_p + log_beta
    b = log_q + log_1m_beta
    top = tl.maximum(a, b)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit
def kd_rows_kernel(
    s, t, y, grad_scale, ce_grad_scale, divergence, ce, V, stride_s, stride_t, inv_tau, jsd_beta,
    BV: tl.constexpr, DIVERGENCE: tl.constexpr, TAU_ONE: tl.constexpr, WANTS_GRAD: tl.constexpr,
    HAS_CE_GRAD: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    s_row, t_row = s + i_n * stride_s, t + i_n * stride_t
    o_v = tl.arange(0, BV)

    # pass 1: online softmaxes; a_t (a_s) is the teacher- (student-) weighted log-ratio, up to the normalisations.
    # Each divergence reads at most one of them; the compiler drops the other (the PTX is the same without it).
    zero = tl.zeros([], dtype=tl.float32)
    m_s, l_s, a_s = zero + FLOOR, zero, zero  # student at the temperature: sum exp(s' - m_s) (s' - t')
    m_t, l_t, a_t = zero + FLOOR, zero, zero  # teacher at the temperature: sum exp(t' - m_t) (t' - s')
    m_1, l_1 = zero + FLOOR, zero  # student at temperature 1 (the CE), when the temperature is not 1
    for v0 in range(0, V, BV):
        m_v = v0 + o_v < V
        b_s = tl.load(s_row + v0 + o_v, mask=m_v, other=0.).to(tl.float32)  # [BV]
        b_t = tl.load(t_row + v0 + o_v, mask=m_v, other=0.).to(tl.float32)  # [BV]
        b_d = (b_t - b_s) * inv_tau  # [BV] t' - s', 0 on masked lanes
        m_s, l_s, a_s = _online(m_s, l_s, a_s, tl.where(m_v, b_s * inv_tau, float("-inf")), -b_d)
        m_t, l_t, a_t = _online(m_t, l_t, a_t, tl.where(m_v, b_t * inv_tau, float("-inf")), b_d)
        if not TAU_ONE:
            m_1, l_1, _ = _online(m_1, l_1, zero, tl.where(m_v, b_s, float("-inf")), b_d)
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    lse_1 = lse_s
    if not TAU_ONE:
        lse_1 = m_1 + tl.log(l_1)
    b_y = tl.load(y + i_n)
    s_y = tl.load(s_row + tl.maximum(b_y, 0)).to(tl.float32)
    tl.store(ce + i_n, tl.where(b_y >= 0, lse_1 - s_y, 0.))

    log_beta = tl.log(jsd_beta)
    log_1m_beta = tl.log(1. - jsd_beta)
    if DIVERGENCE == 0:  # forward KL(p || q) = sum p (t' - s') - lse_t + lse_s
        d_row = a_t / l_t - lse_t + lse_s
    elif DIVERGENCE == 1:  # reverse KL(q || p)
        d_row = a_s / l_s - lse_s + lse_t
    else:  # JSD: pass 2, KL(p || m) and KL(q || m) once both normalisations are known
        kl_pm, kl_qm = zero, zero
        for v0 in range(0, V, BV):
            m_v, _, log_q, log_p = _log_probabilities(s_row, t_row, v0 + o_v, V, inv_tau, lse_s, lse_t)
            log_m = _log_mixture(log_p, log_q, log_beta, log_1m_beta)
            kl_pm += tl.sum(tl.where(m_v, tl.exp(log_p) * (log_p - log_m), 0.), 0)
            kl_qm += tl.sum(tl.where(m_v, tl.exp(log_q) * (log_q - log_m), 0.), 0)
        d_row = jsd_beta * kl_pm + (1. - jsd_beta) * kl_qm
    tl.store(divergence + i_n, d_row)

    if WANTS_GRAD:  # the last pass: the gradient, written over the student's row
        b_scale = tl.load(grad_scale + i_n)
        b_ce_scale = 0.
        if HAS_CE_GRAD:
            b_ce_scale = tl.where(b_y >= 0, tl.load(ce_grad_scale + i_n), 0.)
        for v0 in range(0, V, BV):
            m_v, b_s, log_q, log_p = _log_probabilities(s_row, t_row, v0 + o_v, V, inv_tau, lse_s, lse_t)
            b_q = tl.exp(log_q)
            if DIVERGENCE == 0:  # q - p
                b_g = b_scale * (b_q - tl.exp(log_p))
            elif DIVERGENCE == 1:  # q (log q - log p - KL(q || p))
                b_g = b_scale * b_q * (log_q - log_p - d_row)
            else:  # (1 - beta) q (log q - log m - KL(q || m))
                log_m = _log_mixture(log_p, log_q, log_beta, log_1m_beta)
                b_g = (b_scale * (1. - jsd_beta)) * b_q * (log_q - log_m - kl_qm)
            if HAS_CE_GRAD:
                b_g += b_ce_scale * (tl.exp(b_s - lse_1) - tl.where(v0 + o_v == b_y, 1., 0.))
            tl.store(s_row + v0 + o_v, b_g.to(s.dtype.element_ty), mask=m_v)


def kd_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
            temperature: float, divergence: str, jsd_beta: float, grad_scale: torch.Tensor | None,
            ce_grad_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`kd_rows` in Triton; the gradient, when asked for, is written over student_logits and returned."""
    n, V = student_logits.shape
    assert student_logits.stride(1) == 1 and teacher_logits.stride(1) == 1, "logit rows must be contiguous"
    per_row = torch.empty(n, dtype=torch.float32, device=student_logits.device)
    ce = torch.empty(n, dtype=torch.float32, device=student_logits.device)
    wants_grad = grad_scale is not None
    # the kernel indexes the scales by row: a broadcast (stride 0) vector must be made real
    grad_scale = None if grad_scale is None else grad_scale.contiguous()
    ce_grad_scale = None if ce_grad_scale is None else ce_grad_scale.contiguous()
    block = min(BLOCK_V, triton.next_power_of_2(V))
    kd_rows_kernel[(n,)](
        student_logits, teacher_logits, labels, grad_scale, ce_grad_scale, per_row, ce, V,
        student_logits.stride(0), teacher_logits.stride(0), 1.0 / temperature, jsd_beta,
        BV=block, DIVERGENCE=DIVERGENCES.index(divergence), TAU_ONE=temperature == 1, WANTS_GRAD=wants_grad,
        HAS_CE_GRAD=ce_grad_scale is not None, num_warps=NUM_WARPS if block >= 2048 else 4,
    )
    return per_row, ce, (student_logits if wants_grad else None)
