"""Relative-RMSE tolerances from floating-point rounding, shared by the kernel tests (imported as `rounding`;
pytest puts each test module's directory on sys.path).

A kernel is compared against its reference run in fp64 on the same (rounded) inputs, so what separates the two is the
kernel's own rounding, which these functions bound from the unit roundoff of each dtype, the length of each fp32 sum
and a conditioning ratio computed from the test's data.
"""

import torch

# Unit roundoff u: half the spacing of the numbers near 1, the relative error of a cast to that dtype (rounded to
# nearest on the CPU too: conftest.interpreter_bf16_as_on_the_gpu makes the interpreter round as the GPU does).
# tf32 (what tl.dot makes of fp32 operands on the GPU) keeps fp16's 10 mantissa bits.
U = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
TF32 = 2.0**-11
# Relative errors, in units of fp32's u, of the GPU's approximate fp32 instructions that Triton emits for exp, exp2,
# `/` and rsqrt: ex2.approx and div.full are within 2 ulp (4 u), rsqrt.approx within 2^-22.9 (3 u).
EXP2, DIV, RSQRT = 4, 4, 3


def fp64_leaves(tensors) -> list:
    """The same values as new fp64 leaves (None stays None), on which a reference computes in fp64."""
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def random_cotangent(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random cotangent for `like`, in fp64 but bf16-representable, so that runs in every dtype see the same
    values."""
    return torch.randn(like.shape, generator=generator).bfloat16().to(like.device, torch.float64)


def rounding_tolerances(expected: dict, s2: dict, *, u_in: float = 0.0, casts: int = 0,
                        u_acc: float = U[torch.float32], chain: int = 0, term_error: float = 0.0,
                        result_casts: int = 0, result_error: float = 0.0) -> dict:
    """Relative-RMSE bound per name of `expected`:

        (casts * u_in + (sqrt(chain) + term_error) * u_acc) * rms(S) / rms(expected)
            + result_casts * u_in + result_error * u_acc,                                S = sqrt(s2).

    Each element of `expected` is a sum of terms, and s2 holds, per element, the sum of their squares. Rounding errors
    are taken as independent and zero-mean, each at most u times the value rounded. A sum rounded along a chain of n
    additions (fp32 accumulators, u_acc) is then off by about u sqrt(n) S, as long as its partial sums stay near S
    (terms of random sign); a sum of terms of one sign, whose partial sums grow to the sum itself, belongs in s2 as
    one term, its square. A cast to the input dtype (u_in) of an operand that every term passes through adds u S, and
    the casts of one path add up linearly. term_error is the relative error, in units of u_acc, that every term brings
    into the sum: one per fp32 product, and u |x| for a factor exp(x) of an fp32 x, x's absolute error being the
    factor's relative error. rms(S) / rms(expected) is the output's conditioning: about 1 for a sum of terms of random
    sign, larger for a difference. Last, rounding the result itself adds its own relative error: result_casts casts to
    the input dtype, and result_error units of u_acc from fp32 operations after the sum (an activation)."""
    per_term = casts * u_in + (chain**0.5 + term_error) * u_acc
    per_result = result_casts * u_in + result_error * u_acc
    return {name: per_term * (s2[name].double().mean() / expected[name].double().pow(2).mean()).sqrt().item()
            + per_result for name in expected}


def sigmoid_error(z: torch.Tensor) -> float:
    """Relative error, in units of fp32's u, of sigmoid(z) = 1 / (1 + exp(-z)) computed in fp32 from exact z, at most:
    exp(-z) is exp2(-z log2(e)), and the rounded product, off by u |z| log2(e), makes exp2 off by ln(2) times that,
    u |z|, relative; then exp2 itself, the add and the division."""
    return z.abs().max().item() + EXP2 + 1 + DIV
