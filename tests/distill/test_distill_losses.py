"""Losses: hand-computed values, and the fused chunked KD against the plain full-logits formula and its autograd."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import requires_cuda

from hybridize import losses
from hybridize.kernels.kd_rows import kd_rows
from hybridize.losses import IGNORE, KDOptions, attention_output_loss, kd_loss, next_token_labels


def test_attention_output_mse_by_hand():
    outputs = {2: torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), 5: torch.zeros(1, 2, 2)}
    targets = {2: torch.tensor([[[1.0, 0.0], [3.0, 8.0]]]), 5: torch.full((1, 2, 2), 0.5)}
    total, per_layer = attention_output_loss(outputs, targets)
    assert per_layer[2].item() == pytest.approx((0 + 4 + 0 + 16) / 4)
    assert per_layer[5].item() == pytest.approx(0.25)
    assert total.item() == pytest.approx(5.25)


def test_next_token_labels():
    labels = next_token_labels(torch.tensor([[5, 6, 7], [1, 2, 3]]))
    assert labels.tolist() == [[6, 7, IGNORE], [2, 3, IGNORE]]


def identity_case(student_logits, teacher_logits):
    """Hidden states equal to logits with identity heads, so each row's logits are exactly what is written."""
    s = torch.tensor(student_logits, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(teacher_logits, dtype=torch.float64)
    eye = torch.eye(s.shape[1], dtype=torch.float64)
    return s, eye, t, eye.clone()


def test_kl_and_gradient_by_hand():
    # student uniform over 2 tokens, teacher 3:1
    s, head, t, teacher_head = identity_case([[0.0, 0.0]], [[math.log(3.0), 0.0]])
    out = kd_loss(s, head, t, teacher_head, torch.tensor([0]), KDOptions())
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert out.kl.item() == pytest.approx(kl, abs=1e-12)
    assert out.loss.item() == pytest.approx(kl, abs=1e-12)  # ce_weight 0: no CE term
    assert out.ce.item() == pytest.approx(math.log(2.0), abs=1e-12)  # still reported
    out.loss.backward()
    assert s.grad[0].tolist() == pytest.approx([0.5 - 0.75, 0.5 - 0.25], abs=1e-12)


def test_temperature_and_ce_weight_by_hand():
    s, head, t, teacher_head = identity_case([[0.0, 0.0], [1.0, 0.0]], [[math.log(3.0), 0.0], [0.0, 0.0]])
    labels = torch.tensor([1, IGNORE])
    out = kd_loss(s, head, t, teacher_head, labels, KDOptions(temperature=2.0, ce_weight=0.5))
    r3 = math.sqrt(3.0)
    pt0 = [r3 / (1 + r3), 1 / (1 + r3)]  # softmax([ln 3, 0] / 2)
    ps1 = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]  # softmax([1, 0] / 2)
    kl0 = sum(p * math.log(p / 0.5) for p in pt0)
    kl1 = sum(0.5 * math.log(0.5 / q) for q in ps1)
    kl = (kl0 + kl1) / 2
    ce = math.log(2.0)  # only row 0 is labelled: -log softmax([0, 0])[1]
    assert out.kl.item() == pytest.approx(kl, abs=1e-12)
    assert out.ce.item() == pytest.approx(ce, abs=1e-12)
    assert out.loss.item() == pytest.approx(4 * kl + 0.5 * ce, abs=1e-12)


def reference(student_hidden, student_head, teacher_hidden, teacher_head, labels, options):
    """The formula with full logits and autograd: what the fused, chunked loss must equal."""
    tau = options.temperature
    s = student_hidden @ student_head.T
    t = teacher_hidden @ teacher_head.T
    kl = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), log_target=True, reduction="batchmean")
    ce = F.cross_entropy(s, labels, ignore_index=IGNORE)
    return tau**2 * kl + options.ce_weight * ce, kl, ce


@pytest.mark.parametrize("chunk", [1, 5, 37, 100])
@pytest.mark.parametrize("temperature, ce_weight", [(1.0, 0.0), (1.0, 0.3), (1.7, 0.25)])
@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_equals_full_logits(chunk, temperature, ce_weight, train_head):
    g = torch.Generator().manual_seed(chunk)
    n, c, v = 37, 16, 53
    hidden = torch.randn(n, c, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(v, c, generator=g, dtype=torch.float64, requires_grad=train_head)
    teacher_hidden = torch.randn(n, c, generator=g, dtype=torch.float64)
    teacher_head = torch.randn(v, c, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = IGNORE
    options = KDOptions(temperature=temperature, ce_weight=ce_weight, chunk_tokens=chunk)

    out = kd_loss(hidden, head, teacher_hidden, teacher_head, labels, options)
    (2.5 * out.loss).backward()  # a non-unit upstream gradient must scale the stored gradients
    grads = hidden.grad.clone(), head.grad.clone() if train_head else None
    hidden.grad = None
    head.grad = None
    loss, kl, ce = reference(hidden, head, teacher_hidden, teacher_head, labels, options)
    (2.5 * loss).backward()

    torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.kl.double(), kl.detach(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out.ce.double(), ce.detach(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-9, atol=1e-12)
    if train_head:
        torch.testing.assert_close(grads[1], head.grad, rtol=1e-9, atol=1e-12)


def test_no_grad_path_gives_the_same_loss():
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(9, 8, generator=g), torch.randn(11, 8, generator=g), torch.randn(9, 8, generator=g),
            torch.randn(11, 8, generator=g), torch.randint(0, 11, (9,), generator=g))
    options = KDOptions(temperature=1.3, ce_weight=0.2, chunk_tokens=4)
    with torch.no_grad():
        plain = kd_loss(*args, options)
    fused = kd_loss(args[0].requires_grad_(), *args[1:], options)
    assert fused.loss.requires_grad and not plain.loss.requires_grad
    torch.testing.assert_close(plain.loss, fused.loss.detach())


def test_bf16_autocast_computes_logits_in_bf16_and_stays_close():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(20, 16, generator=g, requires_grad=True)
    head, teacher_hidden, teacher_head = (torch.randn(40, 16, generator=g), torch.randn(20, 16, generator=g),
                                          torch.randn(40, 16, generator=g))
    labels = torch.randint(0, 40, (20,), generator=g)
    exact = kd_loss(hidden, head, teacher_hidden, teacher_head, labels, KDOptions(chunk_tokens=7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = kd_loss(hidden, head, teacher_hidden, teacher_head, labels, KDOptions(chunk_tokens=7))
    assert low.loss.dtype == torch.float32
    assert low.loss.item() != exact.loss.item()  # the logits really were rounded to bf16
    assert low.loss.item() == pytest.approx(exact.loss.item(), rel=0.05)
    low.loss.backward()
    assert hidden.grad.dtype == torch.float32 and torch.isfinite(hidden.grad).all()


def test_ce_weight_without_any_label_adds_nothing():
    """No labelled token: CE is nan (0 / 0) and neither the loss nor the gradient gets a CE term or a nan."""
    torch.manual_seed(0)
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    head, teacher_head = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    unlabelled = torch.full((5,), IGNORE)
    grads = []
    for ce_weight in (0.0, 0.5):
        hidden = s.clone().requires_grad_()
        out = kd_loss(hidden, head, t, teacher_head, unlabelled, KDOptions(ce_weight=ce_weight))
        out.loss.backward()
        assert torch.isnan(out.ce)
        grads.append((out.loss.detach(), hidden.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=0, atol=0)


ROWS_KERNEL_CASES = [("forward_kl", 1.0, 0.0), ("forward_kl", 1.7, 0.25), ("reverse_kl", 1.3, 0.0), ("jsd", 1.0, 0.1)]


def _check_rows_kernel_loss(device, divergence, temperature, ce_weight):
    """The fused loss with its per-row work in the Triton rows kernel, fp32 logits and a loss mask, against the same
    loss in fp64 on the CPU (PyTorch rows). Every value is an fp32 sum over at most V = 1000 terms of exponents below
    30 in size, each off by about u (30 + sqrt(V)) ~ 4e-6 relative: rtol 2e-5 leaves a factor of 5."""
    g = torch.Generator().manual_seed(3)
    n, c, v = 300, 32, 1000
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    exact = [make(n, c), make(v, c) / 2, make(n, c), make(v, c) / 2]
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = IGNORE
    mask = torch.rand(n, generator=g) < 0.7
    options = KDOptions(temperature=temperature, ce_weight=ce_weight, chunk_tokens=128, divergence=divergence,
                        jsd_beta=0.3)
    low = [t.float().to(device) for t in exact]
    for tensors in (exact, low):
        tensors[0].requires_grad_()
    out = kd_loss(*low, labels.to(device), options, mask.to(device))
    out.loss.backward()
    expected = kd_loss(*exact, labels, options, mask)
    expected.loss.backward()
    for name in ("loss", "kl", "ce"):
        torch.testing.assert_close(getattr(out, name).double().cpu(), getattr(expected, name).detach(), rtol=2e-5,
                                   atol=0)
    torch.testing.assert_close(low[0].grad.double().cpu(), exact[0].grad, rtol=2e-5,
                               atol=2e-5 * exact[0].grad.abs().max())


@pytest.mark.parametrize("divergence, temperature, ce_weight", ROWS_KERNEL_CASES)
def test_rows_kernel_interpreted_equals_the_fp64_loss(monkeypatch, divergence, temperature, ce_weight):
    """On the CPU the loss takes the PyTorch rows; here fp32 rows go through the interpreted kernel instead."""
    def kernel_for_fp32(student_logits, *args, **kwargs):
        backend = "reference" if student_logits.dtype == torch.float64 else "triton"
        return kd_rows(student_logits, *args, **{**kwargs, "backend": backend})

    monkeypatch.setattr(losses, "kd_rows", kernel_for_fp32)
    _check_rows_kernel_loss("cpu", divergence, temperature, ce_weight)


@requires_cuda
@pytest.mark.parametrize("divergence, temperature, ce_weight", ROWS_KERNEL_CASES)
def test_cuda_rows_kernel_equals_the_fp64_loss(divergence, temperature, ce_weight):
    _check_rows_kernel_loss("cuda", divergence, temperature, ce_weight)
