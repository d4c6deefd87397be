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
Per chunk, `kernels.kd_rows` takes the two logit matrices to the rows' divergences, CEs and logit gradient: on the
GPU a Triton kernel that reads each logit two or three times and allocates nothing of the chunk's size.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels.kd_rows import kd_rows

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


@dataclass(frozen=True)
class KDOptions:
    temperature: float = 1.0
    ce_weight: float = 0.0
    chunk_tokens: int = 2048
    divergence: str = "forward_kl"  # one of kernels.kd_rows.DIVERGENCES
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
    # per-row gradient scales: tau / N on the rows the divergence is taken on; the CE weight per labelled row
    grad_scale = (torch.full((total,), tau, dtype=exact, device=student_hidden.device) if weights is None
                  else weights * tau) / rows_counted if wants_grad else None  # [N]
    ce_grad_scale = (ce_per_label.expand(total) if wants_grad and options.ce_weight > 0 else None)  # [N]
    for start in range(0, total, options.chunk_tokens):
        rows = slice(start, start + options.chunk_tokens)
        h = student_hidden[rows].to(compute_dtype)  # [n, C]
        per_row, ce_rows, d_logits = kd_rows(
            h @ head_s.T, teacher_hidden[rows].to(compute_dtype) @ head_t.T, labels[rows],  # [n, V] twice
            temperature=tau, divergence=options.divergence, jsd_beta=options.jsd_beta,
            grad_scale=None if grad_scale is None else grad_scale[rows],
            ce_grad_scale=None if ce_grad_scale is None else ce_grad_scale[rows])
        ce_sum += ce_rows.sum()
        divergence_sum += per_row.sum() if weights is None else torch.dot(per_row.to(exact), weights[rows])
        if grad_hidden:
            d_hidden[rows] = (d_logits @ head_s).to(d_hidden.dtype)  # [n, C]
        if grad_head:
            d_head += (d_logits.T @ h).to(exact)  # [V, C]
    divergence = divergence_sum / rows_counted
    ce = ce_sum / labelled  # nan (0 / 0) without labels
    loss = tau**2 * divergence + (
        torch.where(labelled > 0, options.ce_weight * ce, 0.0) if options.ce_weight > 0 else 0.0)
    return loss, divergence.detach(), ce.detach(), d_hidden, (d_head.to(student_head.dtype) if grad_head else None)
