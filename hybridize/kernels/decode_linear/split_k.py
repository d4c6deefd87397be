"""Split-K linear for few rows, in one launch: program (n, s) multiplies the rows by output block n of the weight over
the s-th slice of the reduction axis and stores its fp32 partial tile; the last program of a block to finish (a
per-block atomic count) sums the block's partial tiles, adds the bias and writes the output."""

import torch
import triton
import triton.language as tl

BLOCK_K = 64


@triton.jit
def _split_k_kernel(
    x, w, bias, partials, counts, out, M, N, K, K_SLICE, SLICES, s_xm, s_wn, s_om,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    i_n, i_s = tl.program_id(0), tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = i_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    start = i_s * K_SLICE
    for k0 in range(start, tl.minimum(start + K_SLICE, K), BK):
        kk = k0 + rk
        a = tl.load(x + rm[:, None] * s_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(w + rn[:, None] * s_wn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)  # [BM, BN]
    tile = rm[:, None] * N + rn[None, :]
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(partials + i_s * M * N + tile, acc, mask=inside)
    # Every thread's stores issued (the barrier), then the count (acq_rel, one thread): this program's partial is
    # visible to whichever program counts last, and that one reads every partial after its count.
    tl.debug_barrier()
    finished = tl.atomic_add(counts + i_n, 1)
    if finished == SLICES - 1:
        total = tl.zeros((BM, BN), dtype=tl.float32)
        for s in range(0, SLICES):  # .cg: read past L1, which another SM's writes do not update
            total += tl.load(partials + s * M * N + tile, mask=inside, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            total += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out + rm[:, None] * s_om + rn[None, :], total.to(out.dtype.element_ty), mask=inside)
        tl.atomic_xchg(counts + i_n, 0)  # ready for the next launch (a CUDA graph replays this one)


# Per device, the blocks' counts: zero between launches (each launch's last programs reset theirs), so they are
# allocated and zeroed once, before any CUDA graph capture (the decoder warms up first).
_counts: dict[torch.device, torch.Tensor] = {}


def _counts_for(blocks: int, device: torch.device) -> torch.Tensor:
    if device not in _counts or _counts[device].numel() < blocks:
        _counts[device] = torch.zeros(max(blocks, 1024), dtype=torch.int32, device=device)
    return _counts[device]


def _programs_wanted(device: torch.device) -> int:
    """About one program per SM: enough to stream the weight at full bandwidth."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: a few slices, so the tests cover the partial sums


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    M, K = x.shape
    N = weight.shape[0]
    block_n = 32 if N <= 2048 else 64
    blocks = triton.cdiv(N, block_n)
    k_blocks = triton.cdiv(K, BLOCK_K)
    slices = max(1, min(k_blocks, triton.cdiv(_programs_wanted(x.device), blocks)))
    k_slice = triton.cdiv(k_blocks, slices) * BLOCK_K
    slices = triton.cdiv(K, k_slice)  # no empty slice
    partials = torch.empty((slices, M, N), dtype=torch.float32, device=x.device)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    precision = "tf32" if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    _split_k_kernel[(blocks, slices)](
        x, weight, bias if bias is not None else x, partials, _counts_for(blocks, x.device), out,
        M, N, K, k_slice, slices, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BM=max(16, triton.next_power_of_2(M)), BN=block_n, BK=BLOCK_K,
        PRECISION=precision, num_warps=4,
    )
    return out


# torch.compile keeps the launch as this opaque op instead of tracing the Triton launch and the buffers it fills.
_linear_op = torch.library.custom_op("hybridize::decode_linear", _launch, mutates_args=())


@_linear_op.register_fake
def _(x, weight, bias):
    return torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """See decode_linear in __init__; the Triton version (x and weight need a contiguous last axis)."""
    if weight.stride(-1) != 1:
        raise ValueError("weight needs a contiguous last axis")
    if weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share a dtype, got {x.dtype} and {weight.dtype}")
    rows = x.reshape(-1, x.shape[-1])
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    launch = _linear_op if torch.compiler.is_compiling() else _launch
    return launch(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])
