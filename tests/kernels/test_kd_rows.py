"""KD rows: the Triton forward-KL kernel (interpreted on CPU) against the fp64 reference on the same logits: the
divergence, the CE and the logit gradient, each within a bound derived from the kernel's fp32 rounding."""

import pytest
import torch
from helpers import requires_cuda
from rounding import EXP2, U, cast_roundoff

from hybridize.kernels.kd_rows import kd_rows

IGNORE = -100


def _case(n, V, dtype, *, scale=4.0, device="cpu", seed=0):
    """Student and teacher logits [n, V] in `dtype`, with peaks that force the running maxima to move late in a row
    (the last block) and early, labels with one IGNORE row, and per-row gradient scales with one zero (a masked row)."""
    g = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(n, V, generator=g)
    teacher = scale * torch.randn(n, V, generator=g)
    student[0, V - 2] += 12 * scale  # the largest logit in the last, partial block
    teacher[1, 3] += 12 * scale  # in the first
    labels = torch.randint(0, V, (n,), generator=g)
    labels[2] = IGNORE
    labels[3] = V - 1  # the last column
    grad_scale = torch.rand(n, generator=g)
    grad_scale[4] = 0.0
    ce_grad_scale = torch.rand(n, generator=g)
    to = lambda x: x.to(device)  # noqa: E731
    return (to(student.to(dtype)), to(teacher.to(dtype)), to(labels), to(grad_scale), to(ce_grad_scale))


def _bounds(student, teacher, temperature, dtype, V):
    """Absolute error bounds of the kernel against the fp64 reference on the same rounded logits.

    The kernel forms lse = m + log(sum of exp(x - m)) over V terms in fp32, summed along V / BV block steps of a
    tree reduction each, so each exponent x - lse is off by at most E = u (|x| + |lse| + sqrt(V) + EXP2 + 2): the
    rounded x / T and the rounded lse, the sum's rounding (relative, so absolute in the log), exp2's own error. A
    probability exp(x - lse) is then off by E relative. The divergence a / l - lse_t + lse_s carries the error of
    both lse and of a / l, a weighted mean of t' - s' whose terms are off by E |t' - s'|. The gradient element
    grad_scale (q - p) + ce_grad_scale (q1 - onehot) is off by E (grad_scale (q + p) + ce_grad_scale q1), by the
    fp32 arithmetic that combines the terms (two differences, two products, a sum: 5 u of the terms' sizes), then by
    one rounding to the logits' dtype (`cast_roundoff`), which near zero is at most one step between fp16's
    subnormals (2 u of its smallest normal number; negligible for bf16 and fp32)."""
    s = student.double() / temperature
    t = teacher.double() / temperature
    lse = torch.stack([s.logsumexp(-1), t.logsumexp(-1), student.double().logsumexp(-1)]).abs().max(0).values  # [n]
    largest = torch.maximum(s.abs().amax(-1), t.abs().amax(-1))  # [n]
    per_exponent = U[torch.float32] * (largest + lse + V**0.5 + EXP2 + 2)[:, None]  # [n, 1]
    divergence = per_exponent[:, 0] * (3 + 2 * (t - s).abs().amax(-1))
    return per_exponent, divergence, cast_roundoff(dtype), 2 * U[dtype] * torch.finfo(dtype).smallest_normal


def _grad_bound(student, teacher, labels, expected, grad_scale, ce_grad_scale, temperature, dtype, V):
    """The gradient's elementwise bound (`_bounds`) against the fp64 reference gradient `expected`."""
    per_exponent, _, out_rounding, subnormal_step = _bounds(student, teacher, temperature, dtype, V)
    q = torch.softmax(student.double() / temperature, -1)
    p = torch.softmax(teacher.double() / temperature, -1)
    probabilities = grad_scale.double()[:, None] * (q + p)  # [n, V]
    terms = probabilities.clone()
    if ce_grad_scale is not None:
        ce = (ce_grad_scale.double() * (labels >= 0))[:, None]  # [n, 1]
        q1 = torch.softmax(student.double(), -1)
        onehot = torch.zeros_like(q1).scatter_(1, labels.clamp_min(0)[:, None], 1.0)
        probabilities += ce * q1
        terms += ce * (q1 + onehot)
    return per_exponent * probabilities + 5 * U[torch.float32] * terms + out_rounding * expected.abs() + subnormal_step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("with_ce_grad", [False, True])
def test_forward_kl_rows_match_the_reference(dtype, temperature, with_ce_grad):
    n, V = 6, 4096 + 907  # two blocks, the second partial
    student, teacher, labels, grad_scale, ce_grad_scale = _case(n, V, dtype)
    ce_scale = ce_grad_scale if with_ce_grad else None
    kl, ce, grad = kd_rows(student.clone(), teacher, labels, temperature=temperature, grad_scale=grad_scale,
                           ce_grad_scale=ce_scale, backend="triton")
    ref_kl, ref_ce, ref_grad = kd_rows(student.double(), teacher.double(), labels, temperature=temperature,
                                       grad_scale=grad_scale.double(), ce_grad_scale=None if ce_scale is None
                                       else ce_scale.double(), backend="reference")
    per_exponent, divergence_bound, _, _ = _bounds(student, teacher, temperature, dtype, V)
    assert kl.dtype == ce.dtype == torch.float32 and grad.dtype == dtype
    assert ((kl.double() - ref_kl).abs() <= divergence_bound).all(), (kl, ref_kl)
    assert ((ce.double() - ref_ce).abs() <= 2 * per_exponent[:, 0]).all(), (ce, ref_ce)
    assert ce[2] == 0 and ref_ce[2] == 0  # the row without a label
    bound = _grad_bound(student, teacher, labels, ref_grad, grad_scale, ce_scale, temperature, dtype, V)
    _assert_within(grad, ref_grad, bound, "grad")
    if with_ce_grad:  # the onehot reaches the label's column, including the last one
        assert grad[3, V - 1] < 0 and ref_grad[3, V - 1] < 0
    else:  # a zero grad_scale (a row the loss mask leaves out) and no CE term: nothing
        assert (grad[4] == 0).all()


def _assert_within(actual, expected, bound, name):
    """Elementwise |actual - expected| <= bound, naming the worst element against its bound when not."""
    err = (actual.double() - expected).abs()
    assert torch.isfinite(actual).all(), f"{name}: NaN/inf"
    ratio = err / bound
    worst = ratio.argmax()
    assert ratio.max() <= 1, (f"{name}: element {worst.item()} off by {err.flatten()[worst].item():.3e} > bound "
                              f"{bound.flatten()[worst].item():.3e}, expected {expected.flatten()[worst].item():.6e}")


def test_a_broadcast_scale_vector_is_read_per_row():
    student, teacher, labels, grad_scale, _ = _case(6, 700, torch.float32)
    broadcast = torch.tensor(0.3).expand(6)  # stride 0, as the loss passes its CE weight per labelled row
    _, _, expected = kd_rows(student.clone(), teacher, labels, grad_scale=grad_scale,
                             ce_grad_scale=torch.full((6,), 0.3), backend="triton")
    _, _, grad = kd_rows(student.clone(), teacher, labels, grad_scale=grad_scale, ce_grad_scale=broadcast,
                         backend="triton")
    assert torch.equal(grad, expected)


def test_without_a_gradient_the_logits_are_left_alone():
    student, teacher, labels, _, _ = _case(6, 1000, torch.bfloat16)
    kept = student.clone()
    kl, ce, grad = kd_rows(student, teacher, labels, backend="triton")
    ref_kl, ref_ce, _ = kd_rows(student.double(), teacher.double(), labels, backend="reference")
    assert grad is None and torch.equal(student, kept)
    _, divergence_bound, _, _ = _bounds(student, teacher, 1.0, torch.bfloat16, 1000)
    assert ((kl.double() - ref_kl).abs() <= divergence_bound).all()


def test_identical_logits_give_zero_divergence_and_gradient():
    student, _, labels, grad_scale, _ = _case(6, 3000, torch.float32)
    kl, _, grad = kd_rows(student.clone(), student, labels, grad_scale=grad_scale, backend="triton")
    per_exponent, _, _, _ = _bounds(student, student, 1.0, torch.float32, 3000)
    assert (kl.abs() <= 3 * per_exponent[:, 0]).all()
    assert (grad.abs() <= 2 * per_exponent * torch.softmax(student.double(), -1)).all()


def test_the_kernel_refuses_what_it_does_not_cover():
    student, teacher, labels, _, _ = _case(6, 100, torch.float32)
    with pytest.raises(ValueError, match="forward KL"):
        kd_rows(student, teacher, labels, divergence="jsd", backend="triton")
    with pytest.raises(ValueError, match="forward KL"):
        kd_rows(student.double(), teacher.double(), labels, backend="triton")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_kl_rows_cuda_at_the_llama3_vocabulary(dtype):
    n, V = 64, 128256
    student, teacher, labels, grad_scale, ce_grad_scale = _case(n, V, dtype, device="cuda")
    kl, ce, grad = kd_rows(student.clone(), teacher, labels, temperature=2.0, grad_scale=grad_scale,
                           ce_grad_scale=ce_grad_scale)
    ref = kd_rows(student.double(), teacher.double(), labels, temperature=2.0, grad_scale=grad_scale.double(),
                  ce_grad_scale=ce_grad_scale.double(), backend="reference")
    per_exponent, divergence_bound, _, _ = _bounds(student, teacher, 2.0, dtype, V)
    _assert_within(kl, ref[0], divergence_bound, "divergence")
    _assert_within(ce, ref[1], 2 * per_exponent[:, 0], "ce")
    bound = _grad_bound(student, teacher, labels, ref[2], grad_scale, ce_grad_scale, 2.0, dtype, V)
    _assert_within(grad, ref[2], bound, "grad")
