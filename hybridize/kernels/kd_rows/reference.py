"""Per-row distillation terms in PyTorch: fp32 softmaxes (fp64 for fp64 logits), every divergence."""

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def kd_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
            temperature: float, divergence: str, jsd_beta: float, grad_scale: torch.Tensor | None,
            ce_grad_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """See `kd_rows` in __init__.py: (divergence [n], CE [n], gradient [n, V] in the logits' dtype or None)."""
    tau = temperature
    exact = torch.promote_types(student_logits.dtype, torch.float32)
    logits = student_logits.to(exact)  # [n, V]
    log_ps = F.log_softmax(logits / tau if tau != 1 else logits, dim=-1)  # [n, V]
    log_p1 = log_ps if tau == 1 else F.log_softmax(logits, dim=-1)  # [n, V]
    del logits
    valid = labels >= 0  # [n]
    target = labels.clamp_min(0)[:, None]  # [n, 1]
    ce = -(log_p1.gather(1, target)[:, 0] * valid)  # [n]
    teacher = teacher_logits.to(exact)  # [n, V]
    log_pt = F.log_softmax(teacher / tau if tau != 1 else teacher, dim=-1)  # [n, V]
    del teacher
    per_row, grad = divergence_rows(log_pt, log_ps, divergence, jsd_beta, grad_scale is not None)
    if grad is None:
        return per_row, ce, None
    grad.mul_(grad_scale.to(exact)[:, None])
    if ce_grad_scale is not None:
        d_ce = log_p1.exp_()  # [n, V]: softmax(s), in place (the CE is already taken)
        d_ce.scatter_add_(1, target, torch.full(target.shape, -1.0, dtype=exact, device=d_ce.device))
        grad.add_(d_ce.mul_((ce_grad_scale.to(exact) * valid)[:, None]))  # rows without a label get 0
    return per_row, ce, grad.to(student_logits.dtype)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, V], [n, V] -> [n]: sum_v a * b per row, without an [n, V] product in memory."""
    return torch.bmm(a[:, None, :], b[:, :, None])[:, 0, 0]


def divergence_rows(log_pt: torch.Tensor, log_ps: torch.Tensor, divergence: str, jsd_beta: float,
                    wants_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row, D(teacher, student) from log-probabilities [n, V] at the temperature, and with wants_grad its gradient
    g [n, V] with respect to the student's tempered logits (the table in losses.py). Overwrites log_pt."""
    if divergence == "forward_kl":
        pt = log_pt.exp()  # [n, V]
        per_row = _row_dot(pt, log_pt.sub_(log_ps))  # [n]
        return per_row, (log_ps.exp().sub_(pt) if wants_grad else None)
    qs = log_ps.exp()  # [n, V]
    if divergence == "reverse_kl":
        log_ratio = log_pt.neg_().add_(log_ps)  # [n, V] log q - log p
    else:  # jsd
        beta = jsd_beta
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))  # [n, V]
        teacher_part = _row_dot(log_pt.exp(), log_pt - log_m)  # [n] KL(p || m)
        log_ratio = log_pt.copy_(log_ps).sub_(log_m)  # [n, V] log q - log m
        del log_m
    student_part = _row_dot(qs, log_ratio)  # [n] KL(q || log_ratio's reference)
    per_row = student_part if divergence == "reverse_kl" else beta * teacher_part + (1 - beta) * student_part
    if not wants_grad:
        return per_row, None
    grad = qs.mul_(log_ratio.sub_(student_part[:, None]))  # [n, V]
    return per_row, (grad if divergence == "reverse_kl" else grad.mul_(1 - beta))
