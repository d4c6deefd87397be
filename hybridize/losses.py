"""Distillation losses: per-layer attention-output MSE (stage 1) and a divergence on logits, fused and token-chunked.

The KD loss never holds full-vocabulary logits for all tokens: it takes both models' final hidden states
and output-head weights, and for one chunk of tokens at a time computes both logits, the loss, and the
loss's gradient with respect to the student's hidden states (and head, if trained). Backward only scales
the stored gradients, so no logits are kept for it, and nothing is recomputed.

With p = softmax(t_n / T) (teacher), q = softmax(s_n / T) (student), the N loss rows (all rows, or those a
loss mask keeps) and D one of the divergences below:

    loss = T^2 * mean_n D(p, q) + ce_weight * mean_labelled CE(s_n, y_n)
    d loss / d s_n = (T / N) g_n + ce_weight / M (softmax(s_n) - onehot(y_n)),  g_n = d D / d (s_n / T):

    forward_kl  KL(p || q)                                   g = q - p
    reverse_kl  KL(q || p)                                   g = q * (log q - log p - KL(q || p))
    jsd         beta KL(p || m) + (1 - beta) KL(q || m),     g = (1 - beta) q * (log q - log m - KL(q || m))
                m = beta p + (1 - beta) q

The generalized JSD tends to beta * KL(p || q) as beta -> 0 and to (1 - beta) * KL(q || p) as beta -> 1.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


def attention_output_loss(
    outputs: dict[int, torch.Tensor], targets: dict[int, torch.Tensor]
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(sum over layers of the MSE, {layer: MSE}); MSE is the fp32 mean over all elements of [B, T, C]."""
    per_layer = {i: F.mse_loss(outputs[i].float(), targets[i].float()) for i in targets}
    return torch.stack(list(per_layer.values())).sum(), per_layer


def next_token_labels(input_ids: torch.LongTensor) -> torch.LongTensor:
    """[B, T] labels: the next token at each position, IGNORE at the last one (it has no next token here)."""
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class KDOptions:
    temperature: float = 1.0
    ce_weight: float = 0.0
    chunk_tokens: int = 2048
    divergence: str = "forward_kl"  # one of DIVERGENCES
    jsd_beta: float = 0.5  # jsd only: the teacher's weight in the mixture m


@dataclass
class KDLoss:
    loss: torch.Tensor  # differentiable scalar
    kl: torch.Tensor  # mean divergence over the loss rows at the temperature (KL(teacher || student) by default), detached
    ce: torch.Tensor  # mean next-token CE of the student at temperature 1, detached (nan without labels)


def kd_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    labels: torch.LongTensor | None,
    options: KDOptions = KDOptions(),
    loss_mask: torch.Tensor | None = None,
) -> KDLoss:
    """KD loss from hidden states [N, C] and head weights [V, C]; labels [N] with IGNORE where there is no target;
    loss_mask [N] bool: the rows the divergence is taken on (None: every row).

    Logits are computed in the autocast dtype when autocast is on (else in the hidden states' dtype);
    softmax, KL and CE in fp32 (fp64 for fp64 inputs).
    """
    if labels is None:
        labels = torch.full(student_hidden.shape[:1], IGNORE, dtype=torch.long, device=student_hidden.device)
    device_type = student_hidden.device.type
    compute_dtype = (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else student_hidden.dtype
    )
    wants_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad)
    if wants_grad:
        loss, kl, ce = _FusedKD.apply(student_hidden, student_head, teacher_hidden, teacher_head, labels, options,
                                      compute_dtype, loss_mask)
    else:
        with torch.autocast(device_type, enabled=False):
            loss, kl, ce, _, _ = _kd_forward(student_hidden, student_head, teacher_hidden, teacher_head, labels,
                                             options, compute_dtype, loss_mask, grad_hidden=False, grad_head=False)
    return KDLoss(loss=loss, kl=kl, ce=ce)


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_head, teacher_hidden, teacher_head, labels, options, compute_dtype,
                loss_mask):
        with torch.autocast(student_hidden.device.type, enabled=False):
            loss, kl, ce, grad_hidden, grad_head = _kd_forward(
                student_hidden, student_head, teacher_hidden, teacher_head, labels, options, compute_dtype, loss_mask,
                grad_hidden=ctx.needs_input_grad[0], grad_head=ctx.needs_input_grad[1],
            )
        ctx.grads = (grad_hidden, grad_head)
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        grad_hidden, grad_head = ctx.grads
        ctx.grads = None
        scale = lambda g: None if g is None else g * grad_loss.to(g.dtype)  # noqa: E731
        return scale(grad_hidden), scale(grad_head), None, None, None, None, None, None


def _kd_forward(student_hidden, student_head, teacher_hidden, teacher_head, labels, options, compute_dtype, loss_mask,
                grad_hidden: bool, grad_head: bool):
    """(loss, divergence, ce, d loss / d student_hidden or None, d loss / d student_head or None), chunk by chunk."""
    tau = options.temperature
    total = student_hidden.shape[0]
    exact = torch.promote_types(compute_dtype, torch.float32)  # softmax dtype: fp32, or fp64 for fp64 inputs
    # The counts stay on the device: a host read here would stall the launch queue once per micro batch.
    labelled = (labels != IGNORE).sum().to(exact)
    weights = None if loss_mask is None else loss_mask.to(exact)  # [N] 1 on the rows the divergence is taken on
    rows_counted = total if weights is None else weights.sum().clamp_min(1)  # no row at all: a zero loss, finite
    # CE gradient weight per labelled row; clamped so that with no label at all (every row masked out) it is finite
    ce_per_label = options.ce_weight / labelled.clamp_min(1)
    head_s = student_head.to(compute_dtype)  # [V, C]
    head_t = teacher_head.to(compute_dtype)  # [V, C]
    divergence_sum = torch.zeros((), dtype=exact, device=student_hidden.device)
    ce_sum = torch.zeros((), dtype=exact, device=student_hidden.device)
    d_hidden = torch.empty_like(student_hidden) if grad_hidden else None  # [N, C]
    d_head = torch.zeros(student_head.shape, dtype=exact, device=student_head.device) if grad_head else None
    wants_grad = grad_hidden or grad_head
    for start in range(0, total, options.chunk_tokens):
        rows = slice(start, start + options.chunk_tokens)
        h = student_hidden[rows].to(compute_dtype)  # [n, C]
        y = labels[rows]  # [n]
        logits = (h @ head_s.T).to(exact)  # [n, V]
        log_ps = F.log_softmax(logits / tau if tau != 1 else logits, dim=-1)  # [n, V]
        log_p1 = log_ps if tau == 1 else F.log_softmax(logits, dim=-1)  # [n, V]
        del logits
        valid = y != IGNORE  # [n]
        target = y.clamp_min(0)[:, None]  # [n, 1]
        ce_sum += -(log_p1.gather(1, target)[:, 0] * valid).sum()
        teacher_logits = (teacher_hidden[rows].to(compute_dtype) @ head_t.T).to(exact)  # [n, V]
        log_pt = F.log_softmax(teacher_logits / tau if tau != 1 else teacher_logits, dim=-1)  # [n, V]
        del teacher_logits
        per_row, d_logits = divergence_rows(log_pt, log_ps, options, wants_grad)  # [n], [n, V] or None
        row_weights = None if weights is None else weights[rows]  # [n]
        divergence_sum += per_row.sum() if row_weights is None else torch.dot(per_row, row_weights)
        if not wants_grad:
            continue
        d_logits.mul_(tau / rows_counted if row_weights is None else (row_weights * (tau / rows_counted))[:, None])
        if options.ce_weight > 0:
            d_ce = log_p1.exp_()  # [n, V]: softmax(s), in place (the CE sum is already taken)
            d_ce.scatter_add_(1, target, torch.full(target.shape, -1.0, dtype=exact, device=d_ce.device))
            d_logits.add_(d_ce.mul_(valid[:, None].to(exact) * ce_per_label))  # rows without a label get 0
            del d_ce
        d_logits = d_logits.to(compute_dtype)
        if grad_hidden:
            d_hidden[rows] = (d_logits @ head_s).to(d_hidden.dtype)  # [n, C]
        if grad_head:
            d_head += (d_logits.T @ h).to(exact)  # [V, C]
    divergence = divergence_sum / rows_counted
    ce = ce_sum / labelled  # nan (0 / 0) without labels
    loss = tau**2 * divergence + (
        torch.where(labelled > 0, options.ce_weight * ce, 0.0) if options.ce_weight > 0 else 0.0)
    return loss, divergence.detach(), ce.detach(), d_hidden, (d_head.to(student_head.dtype) if grad_head else None)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, V], [n, V] -> [n]: sum_v a * b per row, without an [n, V] product in memory."""
    return torch.bmm(a[:, None, :], b[:, :, None])[:, 0, 0]


def divergence_rows(log_pt: torch.Tensor, log_ps: torch.Tensor, options: KDOptions,
                    wants_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row, D(teacher, student) from log-probabilities [n, V] at the temperature, and with wants_grad its gradient
    g [n, V] with respect to the student's tempered logits (the module docstring's table). Overwrites log_pt."""
    if options.divergence == "forward_kl":
        pt = log_pt.exp()  # [n, V]
        per_row = _row_dot(pt, log_pt.sub_(log_ps))  # [n]
        return per_row, (log_ps.exp().sub_(pt) if wants_grad else None)
    qs = log_ps.exp()  # [n, V]
    if options.divergence == "reverse_kl":
        log_ratio = log_pt.neg_().add_(log_ps)  # [n, V] log q - log p
    else:  # jsd
        beta = options.jsd_beta
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))  # [n, V]
        teacher_part = _row_dot(log_pt.exp(), log_pt - log_m)  # [n] KL(p || m)
        log_ratio = log_pt.copy_(log_ps).sub_(log_m)  # [n, V] log q - log m
        del log_m
    student_part = _row_dot(qs, log_ratio)  # [n] KL(q || log_ratio's reference)
    per_row = student_part if options.divergence == "reverse_kl" else beta * teacher_part + (1 - beta) * student_part
    if not wants_grad:
        return per_row, None
    grad = qs.mul_(log_ratio.sub_(student_part[:, None]))  # [n, V]
    return per_row, (grad if options.divergence == "reverse_kl" else grad.mul_(1 - beta))
