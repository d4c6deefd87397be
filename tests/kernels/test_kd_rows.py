"""KD rows: the Triton kernel (interpreted on CPU), every divergence, against the fp64 reference on the same logits: the
divergence, the CE and the logit gradient, each within a bound derived from the kernel's fp32 rounding."""

import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import requires_cuda
from rounding import EXP2, U

from hybridize.kernels.kd_rows import DIVERGENCES, kd_rows

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


class Bounds:
    """Absolute error bounds of the kernel against the fp64 reference on the same rounded logits.

    The kernel forms lse = m + log(sum of exp(x - m)) over V terms in fp32, summed along V / BV block steps of a
    tree reduction each, so each exponent x - lse is off by at most E = u (|x| + |lse| + sqrt(V) + EXP2 + 2): the
    rounded x / T and the rounded lse, the sum's rounding (relative, so absolute in the log), exp2's own error. A
    probability exp(x - lse) is then off by E relative, a log-probability by E absolute, and the JSD's log m, a log
    of two such terms, by E and a few u.

    Divergences. Forward KL a / l - lse_t + lse_s carries both lse errors and that of a / l, a weighted mean of
    t' - s' whose terms are off by E |t' - s'|; the reverse KL likewise with s and t swapped. The JSD's sums of
    p (log p - log m) and q (log q - log m) are off by E (|log p - log m| + 2) p per term (and the same for q).

    Gradients, per element, with r the factor after q:
        forward  grad_scale (q - p)                         E grad_scale (q + p)
        reverse  grad_scale q r,  r = log q - log p - D     grad_scale q (E (|r| + 3) + err D)
        jsd      grad_scale (1 - beta) q r,  r = log q - log m - KL(q || m), likewise, + 1 E for log m
    plus ce_grad_scale (q1 - onehot): E ce_grad_scale q1; then the fp32 arithmetic that combines the terms (5 u of
    their sizes, the one-hot's included), and one rounding to the logits' dtype (u of that dtype), which near zero is
    at most one step between fp16's subnormals (2 u of its smallest normal number; negligible for bf16 and fp32)."""

    def __init__(self, student, teacher, labels, temperature, divergence, beta=0.5):
        dtype, V = student.dtype, student.shape[1]
        s, t = student.double() / temperature, teacher.double() / temperature
        self.log_q, self.log_p = s.log_softmax(-1), t.log_softmax(-1)  # [n, V]
        self.q, self.p = self.log_q.exp(), self.log_p.exp()
        self.q1 = student.double().softmax(-1)
        lse = torch.stack([s.logsumexp(-1), t.logsumexp(-1), student.double().logsumexp(-1)]).abs().max(0).values
        largest = torch.maximum(s.abs().amax(-1), t.abs().amax(-1))  # [n]
        self.E = U[torch.float32] * (largest + lse + V**0.5 + EXP2 + 2)[:, None]  # [n, 1]
        self.labels, self.divergence, self.beta = labels, divergence, beta
        if divergence == "jsd":
            self.log_m = torch.logaddexp(self.log_p + math.log(beta), self.log_q + math.log1p(-beta))  # [n, V]
            e_pm = (self.p * ((self.log_p - self.log_m).abs() + 2)).sum(-1)  # [n]
            e_qm = (self.q * ((self.log_q - self.log_m).abs() + 2)).sum(-1)  # [n]
            self.kl_qm = (self.q * (self.log_q - self.log_m)).sum(-1)  # [n]
            self.err_qm = self.E[:, 0] * e_qm
            self.per_row = self.E[:, 0] * (beta * e_pm + (1 - beta) * e_qm)
        else:
            self.per_row = self.E[:, 0] * (3 + 2 * (t - s).abs().amax(-1))
        self.out_rounding = U[dtype]
        self.subnormal_step = 2 * U[dtype] * torch.finfo(dtype).smallest_normal

    def grad(self, expected, grad_scale, ce_grad_scale, d_row):
        """The gradient's elementwise bound, from the reference gradient [n, V] and divergence per row [n]."""
        scale = grad_scale.double()[:, None]  # [n, 1]
        if self.divergence == "forward_kl":
            kernel = self.E * scale * (self.q + self.p)
            terms = scale * (self.q + self.p)
        elif self.divergence == "reverse_kl":
            r = self.log_q - self.log_p - d_row[:, None]
            kernel = scale * self.q * (self.E * (r.abs() + 3) + self.per_row[:, None])
            terms = scale * self.q * (r.abs() + 1)
        else:
            r = self.log_q - self.log_m - self.kl_qm[:, None]
            kernel = scale * (1 - self.beta) * self.q * (self.E * (r.abs() + 4) + self.err_qm[:, None])
            terms = scale * self.q * (r.abs() + 1)
        if ce_grad_scale is not None:
            ce = (ce_grad_scale.double() * (self.labels >= 0))[:, None]  # [n, 1]
            onehot = torch.zeros_like(self.q1).scatter_(1, self.labels.clamp_min(0)[:, None], 1.0)
            kernel = kernel + self.E * ce * self.q1
            terms = terms + ce * (self.q1 + onehot)
        return kernel + 5 * U[torch.float32] * terms + self.out_rounding * expected.abs() + self.subnormal_step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("with_ce_grad", [False, True])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_rows_match_the_reference(divergence, dtype, temperature, with_ce_grad):
    n, V = 6, 4096 + 907  # two blocks, the second partial
    student, teacher, labels, grad_scale, ce_grad_scale = _case(n, V, dtype)
    ce_scale = ce_grad_scale if with_ce_grad else None
    beta = 0.3
    d_row, ce, grad = kd_rows(student.clone(), teacher, labels, temperature=temperature, divergence=divergence,
                              jsd_beta=beta, grad_scale=grad_scale, ce_grad_scale=ce_scale, backend="triton")
    ref_d, ref_ce, ref_grad = kd_rows(student.double(), teacher.double(), labels, temperature=temperature,
                                      divergence=divergence, jsd_beta=beta, grad_scale=grad_scale.double(),
                                      ce_grad_scale=None if ce_scale is None else ce_scale.double(),
                                      backend="reference")
    bounds = Bounds(student, teacher, labels, temperature, divergence, beta)
    assert d_row.dtype == ce.dtype == torch.float32 and grad.dtype == dtype
    _assert_within(d_row, ref_d, bounds.per_row, "divergence")
    _assert_within(ce, ref_ce, 2 * bounds.E[:, 0], "ce")
    assert ce[2] == 0 and ref_ce[2] == 0  # the row without a label
    _assert_within(grad, ref_grad, bounds.grad(ref_grad, grad_scale, ce_scale, ref_d), "grad")
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
    _assert_within(kl, ref_kl, Bounds(student, teacher, labels, 1.0, "forward_kl").per_row, "divergence")


def test_identical_logits_give_zero_divergence_and_gradient():
    student, _, labels, grad_scale, _ = _case(6, 3000, torch.float32)
    kl, _, grad = kd_rows(student.clone(), student, labels, grad_scale=grad_scale, backend="triton")
    E = Bounds(student, student, labels, 1.0, "forward_kl").E
    assert (kl.abs() <= 3 * E[:, 0]).all()
    assert (grad.abs() <= 2 * E * torch.softmax(student.double(), -1)).all()


def test_the_kernel_refuses_fp64_and_an_unknown_divergence():
    student, teacher, labels, _, _ = _case(6, 100, torch.float32)
    with pytest.raises(ValueError, match="fp32, fp16 and bf16"):
        kd_rows(student.double(), teacher.double(), labels, backend="triton")
    with pytest.raises(ValueError, match="divergence must be one of"):
        kd_rows(student, teacher, labels, divergence="kl", backend="triton")


HOPPER_COMPILE = """
import itertools, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hybridize.kernels.kd_rows import DIVERGENCES
from hybridize.kernels.kd_rows.online import BLOCK_V, NUM_WARPS, kd_rows_kernel

names = kd_rows_kernel.arg_names
for divergence, wants_grad in itertools.product(range(len(DIVERGENCES)), (False, True)):
    pointer = "*fp32" if wants_grad else "constexpr"
    signature = {"s": "*bf16", "t": "*bf16", "y": "*i64", "grad_scale": pointer, "ce_grad_scale": pointer,
                 "divergence": "*fp32", "ce": "*fp32", "V": "i32", "stride_s": "i32", "stride_t": "i32",
                 "inv_tau": "fp32", "jsd_beta": "fp32", "BV": "constexpr", "DIVERGENCE": "constexpr",
                 "TAU_ONE": "constexpr", "WANTS_GRAD": "constexpr", "HAS_CE_GRAD": "constexpr"}
    assert set(signature) == set(names), names
    constants = {"BV": BLOCK_V, "DIVERGENCE": divergence, "TAU_ONE": False, "WANTS_GRAD": wants_grad,
                 "HAS_CE_GRAD": wants_grad}
    if not wants_grad:
        constants.update(grad_scale=None, ce_grad_scale=None)
    source = ASTSource(fn=kd_rows_kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": NUM_WARPS})
    assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]
    print("compiled", DIVERGENCES[divergence], wants_grad)
"""


def test_the_kernel_compiles_for_hopper():
    """The interpreter runs the kernel's Python, not its compiled form. Here Triton compiles it as a CUDA launch would,
    to an sm_90 binary with the ptxas it ships (no GPU needed): every divergence, bf16 logits, T != 1, with and without
    the gradient and its CE term. In a child process, since this one has Triton in interpreter mode."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled") == 2 * len(DIVERGENCES)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_rows_cuda_at_the_llama3_vocabulary(divergence, dtype):
    n, V = 64, 128256
    student, teacher, labels, grad_scale, ce_grad_scale = _case(n, V, dtype, device="cuda")
    d_row, ce, grad = kd_rows(student.clone(), teacher, labels, temperature=2.0, divergence=divergence,
                              grad_scale=grad_scale, ce_grad_scale=ce_grad_scale)
    ref = kd_rows(student.double(), teacher.double(), labels, temperature=2.0, divergence=divergence,
                  grad_scale=grad_scale.double(), ce_grad_scale=ce_grad_scale.double(), backend="reference")
    bounds = Bounds(student, teacher, labels, 2.0, divergence)
    _assert_within(d_row, ref[0], bounds.per_row, "divergence")
    _assert_within(ce, ref[1], 2 * bounds.E[:, 0], "ce")
    _assert_within(grad, ref[2], bounds.grad(ref[2], grad_scale, ce_grad_scale, ref[0]), "grad")
