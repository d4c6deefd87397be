"""Forward KL and CE per row in Triton: one program a row, two passes over the vocabulary in blocks.

Pass 1 keeps running maxima and sums (online softmax) of the student's and the teacher's tempered logits, and of the
student's at temperature 1 when the temperature is not 1, so the divergence and CE come out of one read of both
rows. Pass 2, only for training, writes the gradient over the student's row. Nothing of size [n, V] is allocated.
"""

import torch
import triton
import triton.language as tl

# a block of the vocabulary per loop step; 8 warps hold 16 values of each block tensor a thread
BLOCK_V, NUM_WARPS = 4096, 8
# the running maxima start here instead of -inf, so a block of masked lanes gives exp(-inf - FLOOR) = 0, not NaN
FLOOR = tl.constexpr(-1.0e30)


@triton.jit
def _online(m, l, x):
    """Running max m and sum l of exp(x - m) after the block x (masked lanes -inf): (m', l', scale of old sums)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    rescale = tl.exp(m - m_new)
    return m_new, l * rescale + tl.sum(tl.exp(x - m_new), 0), rescale


@triton.jit
def forward_kl_rows_kernel(
    s, t, y, grad_scale, ce_grad_scale, kl, ce, V, stride_s, stride_t, inv_tau,
    BV: tl.constexpr, TAU_ONE: tl.constexpr, WANTS_GRAD: tl.constexpr, HAS_CE_GRAD: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    s_row, t_row = s + i_n * stride_s, t + i_n * stride_t
    o_v = tl.arange(0, BV)

    zero = tl.zeros([], dtype=tl.float32)
    m_s, l_s = zero + FLOOR, zero  # student at the temperature
    m_t, l_t = zero + FLOOR, zero  # teacher at the temperature
    a_t = zero  # sum of exp(t' - m_t) (t' - s'): the teacher-weighted log-ratio, up to the normalisations
    m_1, l_1 = zero + FLOOR, zero  # student at temperature 1 (the CE), when the temperature is not 1
    for v0 in range(0, V, BV):
        m_v = v0 + o_v < V
        b_s = tl.load(s_row + v0 + o_v, mask=m_v, other=0.).to(tl.float32)  # [BV]
        b_t = tl.load(t_row + v0 + o_v, mask=m_v, other=0.).to(tl.float32)  # [BV]
        b_ss = tl.where(m_v, b_s * inv_tau, float("-inf"))
        b_tt = tl.where(m_v, b_t * inv_tau, float("-inf"))
        m_s, l_s, _ = _online(m_s, l_s, b_ss)
        m_new = tl.maximum(m_t, tl.max(b_tt, 0))
        b_p = tl.exp(b_tt - m_new)  # [BV], 0 on masked lanes
        rescale = tl.exp(m_t - m_new)
        l_t = l_t * rescale + tl.sum(b_p, 0)
        a_t = a_t * rescale + tl.sum(b_p * tl.where(m_v, (b_t - b_s) * inv_tau, 0.), 0)
        m_t = m_new
        if not TAU_ONE:
            m_1, l_1, _ = _online(m_1, l_1, tl.where(m_v, b_s, float("-inf")))
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    lse_1 = lse_s
    if not TAU_ONE:
        lse_1 = m_1 + tl.log(l_1)
    tl.store(kl + i_n, a_t / l_t - lse_t + lse_s)
    b_y = tl.load(y + i_n)
    s_y = tl.load(s_row + tl.maximum(b_y, 0)).to(tl.float32)
    tl.store(ce + i_n, tl.where(b_y >= 0, lse_1 - s_y, 0.))

    if WANTS_GRAD:
        b_kl_scale = tl.load(grad_scale + i_n)
        b_ce_scale = 0.
        if HAS_CE_GRAD:
            b_ce_scale = tl.where(b_y >= 0, tl.load(ce_grad_scale + i_n), 0.)
        for v0 in range(0, V, BV):
            m_v = v0 + o_v < V
            b_s = tl.load(s_row + v0 + o_v, mask=m_v, other=0.).to(tl.float32)  # [BV]
            b_t = tl.load(t_row + v0 + o_v, mask=m_v, other=0.).to(tl.float32)  # [BV]
            b_g = b_kl_scale * (tl.exp(b_s * inv_tau - lse_s) - tl.exp(b_t * inv_tau - lse_t))  # [BV]
            if HAS_CE_GRAD:
                b_g += b_ce_scale * (tl.exp(b_s - lse_1) - tl.where(v0 + o_v == b_y, 1., 0.))
            tl.store(s_row + v0 + o_v, b_g.to(s.dtype.element_ty), mask=m_v)


def forward_kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                    temperature: float, grad_scale: torch.Tensor | None,
                    ce_grad_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`kd_rows` for the forward KL; the gradient, when asked for, is written over student_logits and returned."""
    n, V = student_logits.shape
    assert student_logits.stride(1) == 1 and teacher_logits.stride(1) == 1, "logit rows must be contiguous"
    kl = torch.empty(n, dtype=torch.float32, device=student_logits.device)
    ce = torch.empty(n, dtype=torch.float32, device=student_logits.device)
    wants_grad = grad_scale is not None
    # the kernel indexes the scales by row: a broadcast (stride 0) vector must be made real
    grad_scale = None if grad_scale is None else grad_scale.contiguous()
    ce_grad_scale = None if ce_grad_scale is None else ce_grad_scale.contiguous()
    block = min(BLOCK_V, triton.next_power_of_2(V))
    forward_kl_rows_kernel[(n,)](
        student_logits, teacher_logits, labels, grad_scale, ce_grad_scale, kl, ce, V,
        student_logits.stride(0), teacher_logits.stride(0), 1.0 / temperature,
        BV=block, TAU_ONE=temperature == 1, WANTS_GRAD=wants_grad, HAS_CE_GRAD=ce_grad_scale is not None,
        num_warps=NUM_WARPS if block >= 2048 else 4,
    )
    return kl, ce, (student_logits if wants_grad else None)
