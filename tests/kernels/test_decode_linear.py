"""The decode step's few-row linear (split-K, the partial tiles summed in the same launch) against fp64 F.linear,
within fp32 accumulation and one rounding to the output dtype; its per-block counts are left at zero for the next
launch; and on the GPU, compiled and replayed in a CUDA graph."""

import pytest
import torch
import torch.nn.functional as F
from helpers import requires_cuda

from hybridize.kernels.decode_linear import MAX_ROWS, decode_linear, split_k

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _inputs(M, N, K, dtype, bias, device="cpu", seed=0):
    """x as M rows of a wider tensor (a view of a joined projection has such a row stride), weight [N, K], bias."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K + 3, generator=gen)[:, :K]
    w = torch.randn(N, K, generator=gen) / K**0.5
    b = torch.randn(N, generator=gen) if bias else None
    return [t.to(device=device, dtype=dtype) if t is not None else None for t in (x, w, b)]


def _check(got, x, w, b):
    """|got - y| <= u_out |y| + (K + 2) 2^-24 (|x| |w|^T + |b|): the fp32 sums of K products (in any order, partial
    tiles included) and the bias, then one rounding to the output dtype; y in fp64 from the same low-precision inputs."""
    x64, w64 = x.double(), w.double()
    b64 = b.double() if b is not None else None
    want = F.linear(x64, w64, b64)
    scale = F.linear(x64.abs(), w64.abs(), b64.abs() if b64 is not None else None)
    bound = UNIT_ROUNDOFF[x.dtype] * want.abs() + (x.shape[-1] + 2) * 2.0**-24 * scale
    assert got.dtype == x.dtype and got.shape == want.shape
    excess = (got.double() - want).abs() - bound
    assert excess.max() <= 0, f"error exceeds the bound by {excess.max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M,N,K", [(1, 5, 7), (3, 33, 300), (16, 100, 129), (17, 70, 64), (64, 40, 520)])
def test_triton_matches_fp64_linear(M, N, K, bias, dtype):
    """Odd widths, partial output blocks, partial and several reduction slices (the interpreter asks for 8
    programs, so a 2-block output splits its reduction in up to 4), row counts from 1 to MAX_ROWS."""
    x, w, b = _inputs(M, N, K, dtype, bias)
    _check(decode_linear(x, w, b, backend="triton"), x, w, b)


def test_leading_axes_and_counts_left_at_zero():
    """x [B, 1, K] (a decode step's) -> [B, 1, N]; every block's count is back at zero after a launch, so a second
    launch (a CUDA graph replay) sums its own partials only, and gives the same output."""
    x, w, b = _inputs(6, 70, 300, torch.float32, True)
    first = decode_linear(x[:, None], w, b, backend="triton")
    assert first.shape == (6, 1, 70)
    assert not split_k._counts[x.device].any()
    assert torch.equal(decode_linear(x[:, None], w, b, backend="triton"), first)
    _check(first[:, 0], x, w, b)


def test_more_rows_than_the_kernel_takes_is_the_reference():
    x, w, b = _inputs(MAX_ROWS + 1, 40, 70, torch.float32, True)
    assert torch.equal(decode_linear(x, w, b, backend="triton"), F.linear(x, w, b))


def test_reference_is_linear():
    x, w, b = _inputs(4, 9, 11, torch.float32, True)
    assert torch.equal(decode_linear(x, w, b, backend="reference"), F.linear(x, w, b))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,N,K", [(16, 2560, 576), (16, 576, 1536), (16, 3072, 576), (5, 576, 1152), (64, 33, 4100)])
def test_cuda_compiled_and_replayed_matches_fp64_linear(M, N, K, dtype):
    """The decode shapes of a SmolLM2-size layer (joined input projection, MLP down, MLP gate and up, joined output)
    and one of many slices, on the GPU: eager, then compiled and replayed three times in a CUDA graph (each replay
    must find the counts at zero)."""
    x, w, b = _inputs(M, N, K, dtype, True, device="cuda")
    _check(decode_linear(x, w, b), x, w, b)
    compiled = torch.compile(lambda x: decode_linear(x, w, b) * 2)
    static = x.clone()
    for _ in range(2):  # compile and warm up outside the capture
        compiled(static)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(static)
    for seed in (1, 2, 3):
        static.copy_(_inputs(M, N, K, dtype, True, device="cuda", seed=seed)[0])
        graph.replay()
        torch.cuda.synchronize()
        _check(out / 2, static, w, b)
