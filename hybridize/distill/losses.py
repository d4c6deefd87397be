"""Distillation losses: per-layer attention-output MSE (stage 1) and forward KL on logits, fused and token-chunked (stage 2).

The KD loss never holds full-vocabulary logits for all tokens: it takes both models' final hidden states
and output-head weights, and for one chunk of tokens at a time computes both logits, the loss, and the
loss's gradient with respect to the student's hidden states (and head, if trained). Backward only scales
the stored gradients, so no logits are kept for it, and nothing is recomputed.

    loss = T^2 * mean_n KL(softmax(t_n / T) || softmax(s_n / T)) + ce_weight * mean_labelled CE(s_n, y_n)
    d loss / d s_n = (T / N) (softmax(s_n / T) - softmax(t_n / T)) + ce_weight / M (softmax(s_n) - onehot(y_n))
"""

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


@dataclass(frozen=True)
class KDOptions:
    temperature: float = 1.0
    ce_weight: float = 0.0
    chunk_tokens: int = 2048


@dataclass
class KDLoss:
    loss: torch.Tensor  # differentiable scalar
    kl: torch.Tensor  # mean KL(teacher || student) at the temperature, detached
    ce: torch.Tensor  # mean next-token CE of the student at temperature 1, detached (nan without labels)


def kd_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    labels: torch.LongTensor | None,
    options: KDOptions = KDOptions(),
) -> KDLoss:
    """KD loss from hidden states [N, C] and head weights [V, C]; labels [N] with IGNORE where there is no target.

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
                                      compute_dtype)
    else:
        with torch.autocast(device_type, enabled=False):
            loss, kl, ce, _, _ = _kd_forward(student_hidden, student_head, teacher_hidden, teacher_head, labels,
                                             options, compute_dtype, grad_hidden=False, grad_head=False)
    return KDLoss(loss=loss, kl=kl, ce=ce)


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_head, teacher_hidden, teacher_head, labels, options, compute_dtype):
        with torch.autocast(student_hidden.device.type, enabled=False):
            loss, kl, ce, grad_hidden, grad_head = _kd_forward(
                student_hidden, student_head, teacher_hidden, teacher_head, labels, options, compute_dtype,
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
        return scale(grad_hidden), scale(grad_head), None, None, None, None, None


def _kd_forward(student_hidden, student_head, teacher_hidden, teacher_head, labels, options, compute_dtype,
                grad_hidden: bool, grad_head: bool):
    """(loss, kl, ce, d loss / d student_hidden or None, d loss / d student_head or None), chunk by chunk."""
    tau = options.temperature
    total = student_hidden.shape[0]
    exact = torch.promote_types(compute_dtype, torch.float32)  # softmax dtype: fp32, or fp64 for fp64 inputs
    # The count stays on the device: a host read here would stall the launch queue once per micro batch.
    labelled = (labels != IGNORE).sum().to(exact)
    # CE gradient weight per labelled row; clamped so that with no label at all (every row masked out) it is finite
    ce_per_label = options.ce_weight / labelled.clamp_min(1)
    head_s = student_head.to(compute_dtype)  # [V, C]
    head_t = teacher_head.to(compute_dtype)  # [V, C]
    kl_sum = torch.zeros((), dtype=exact, device=student_hidden.device)
    ce_sum = torch.zeros((), dtype=exact, device=student_hidden.device)
    d_hidden = torch.empty_like(student_hidden) if grad_hidden else None  # [N, C]
    d_head = torch.zeros(student_head.shape, dtype=exact, device=student_head.device) if grad_head else None
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
        pt = log_pt.exp()  # [n, V]
        diff = log_pt.sub_(log_ps)  # [n, V], log_pt is not needed any more
        kl_sum += torch.dot(pt.flatten(), diff.flatten())
        del diff
        if not (grad_hidden or grad_head):
            continue
        d_logits = log_ps.exp().sub_(pt).mul_(tau / total)  # [n, V], the KL term's gradient
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
    kl = kl_sum / total
    ce = ce_sum / labelled  # nan (0 / 0) without labels
    loss = tau**2 * kl + (torch.where(labelled > 0, options.ce_weight * ce, 0.0) if options.ce_weight > 0 else 0.0)
    return loss, kl.detach(), ce.detach(), d_hidden, (d_head.to(student_head.dtype) if grad_head else None)
