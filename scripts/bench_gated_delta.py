"""Benchmark the gated delta rule (chunk forward, forward+backward, decode step) against fla-core on a CUDA GPU.

Run: python scripts/bench_gated_delta.py [--headline | --models | --profile | --raw-inputs].
Prints ms (median of triton.testing.do_bench), the ratio to the peer (fla-core, when installed) and to the
ideal-byte floor (bytes read once + written once at 3.0 TB/s).
--headline stops after the headline shape and the decode step (fla's autotuning of every shape takes minutes).
--models runs only the SmolLM2 and Llama-3.2-1B shapes: decode steps at B 64 and 512, chunks at T = 2K, 8K, 32K.
--profile prints instead where the fwd+bwd time goes, kernel by kernel, for ours and the peer at the headline shape.
--raw-inputs times fwd+bwd from the layer's raw q, k, a, b: the norms, gate and beta formed in PyTorch before the op
against the op forming them (gate_params, qk_l2norm), at the SmolLM2 and headline shapes.
"""

import sys

import torch
import torch.nn.functional as F
import triton

from kernel_profile import print_kernel_table

from hybridize.kernels.gated_delta import chunk as chunk_module
from hybridize.kernels.gated_delta import GateParams, chunk_gated_delta_rule, gated_delta_step
from hybridize.model.gated_deltanet import l2_normalize

try:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent
except ImportError:
    fla_chunk = fla_recurrent = None
else:
    # TIMING ONLY: fla-core 0.6.0 raises in chunk_bwd_dqkwg when g is given on Hopper with 3.4.0 <= Triton < 3.7.1
    # (its module-level TRITON_ABOVE_3_7_1 is False there; see fla issue #640). fla's gated gradients are WRONG
    # under these Triton versions; we clear the guard only so that its backward can be timed, never compared.
    import fla.ops.common.chunk_o as _fla_chunk_o
    _fla_chunk_o.TRITON_ABOVE_3_7_1 = True

BANDWIDTH = 3.0e12  # B/s, the copy bandwidth measured on the H100
BF16, FP32 = 2, 4


def make(B, T, H, D, requires_grad):
    q = F.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1).bfloat16()
    k = F.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1).bfloat16()
    v = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda") + 2.0)
    beta = torch.rand(B, T, H, device="cuda").bfloat16()
    return [x.requires_grad_(requires_grad) for x in (q, k, v, g, beta)]


def time_ms(fn, *args):
    """Median ms of fn(*args); 'n/a' when fn is missing or fails (e.g. a peer that refuses this Triton)."""
    if fn is None:
        return None
    try:
        return triton.testing.do_bench(lambda: fn(*args), warmup=10, rep=40)
    except Exception as e:  # noqa: BLE001 - a peer's failure is reported, not fatal
        print(f"  peer failed: {type(e).__name__}: {str(e)[:100]}")
        return None


def fwd(chunk_fn):
    if chunk_fn is None:
        return None
    # g and beta by keyword: newer fla-core puts gk, gv between them in some signatures
    return lambda q, k, v, g, beta: chunk_fn(q, k, v, g=g, beta=beta, scale=q.shape[-1] ** -0.5)[0]


def fwd_bwd(chunk_fn):
    if chunk_fn is None:
        return None

    def run(q, k, v, g, beta):
        for x in (q, k, v, g, beta):
            x.grad = None
        o = chunk_fn(q, k, v, g=g, beta=beta, scale=q.shape[-1] ** -0.5)[0]
        o.backward(torch.ones_like(o))

    return run


def row(name, ours_fn, peer_fn, inputs, floor_ms):
    """One line, and our ms: ours is timed and printed first, so a time limit hit in the peer's autotuning keeps it."""
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    ours = time_ms(ours_fn, *inputs)
    print(f"{name:44s} ours {fmt(ours):>8s} ms   floor {floor_ms:.3f} ms   ours/floor {ours / floor_ms:.1f}",
          end="", flush=True)
    peer = time_ms(peer_fn, *inputs)
    ratio = "n/a" if peer is None else f"{ours / peer:.2f}"
    print(f"   fla {fmt(peer):>8s} ms   ours/fla {ratio:>5s}")
    return ours


def bench_chunk(label, B, T, H, D):
    n = B * T * H
    # q, k, v, beta (bf16) and g (fp32) read once, o written once
    fwd_bytes = n * (3 * D * BF16 + BF16 + FP32) + n * D * BF16
    # backward adds do read once and dq, dk, dv, dbeta (bf16), dg (fp32) written once
    bwd_bytes = n * D * BF16 + n * (3 * D * BF16 + BF16 + FP32)
    inputs = make(B, T, H, D, requires_grad=False)
    row(f"{label} B{B} T{T} H{H} D{D} fwd", fwd(chunk_gated_delta_rule), fwd(fla_chunk), inputs,
        fwd_bytes / BANDWIDTH * 1e3)
    inputs = make(B, T, H, D, requires_grad=True)
    row(f"{label} B{B} T{T} H{H} D{D} fwd+bwd", fwd_bwd(chunk_gated_delta_rule), fwd_bwd(fla_chunk), inputs,
        (fwd_bytes + bwd_bytes) / BANDWIDTH * 1e3)


def bench_step(B, H, D):
    q, k, v, g, beta = (x[:, 0].contiguous() for x in make(B, 1, H, D, requires_grad=False))
    state = torch.randn(B, H, D, D, device="cuda")
    peer = None
    if fla_recurrent is not None:
        # fla's decode: a [B, 1, H, D] sequence of one token, the state passed in and returned
        def peer():
            return fla_recurrent(q[:, None], k[:, None], v[:, None], g=g[:, None], beta=beta[:, None],
                                 initial_state=state, output_final_state=True)
    nbytes = 2 * state.numel() * FP32 + B * H * (4 * D * BF16 + BF16 + FP32)  # state read + written, tokens, o
    ours = row(f"decode step B{B} H{H} D{D} fp32 state", lambda: gated_delta_step(q, k, v, g, beta, state), peer, (),
               nbytes / BANDWIDTH * 1e3)
    achieved = nbytes / (ours * 1e-3)  # B/s
    print(f"{'':44s} ours {achieved / 1e9:.0f} GB/s = {achieved / BANDWIDTH:.0%} of 3.0 TB/s")


def bench_raw_inputs(B, T, HK, H, D):
    """fwd+bwd from raw inputs laid out as the layer has them (views of one projection), un-fused and fused."""
    qkv = torch.randn(B, T, (2 * HK + H) * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ab = torch.randn(B, T, 2 * H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    A_log, dt_bias, b_bias = (torch.randn(H, device="cuda", requires_grad=True) for _ in range(3))
    with torch.no_grad():
        dt_bias -= 4.0

    def run(fused):
        for x in (qkv, ab, A_log, dt_bias, b_bias):
            x.grad = None
        q, k, v = (x.unflatten(-1, (-1, D)) for x in qkv.split([HK * D, HK * D, H * D], -1))
        a, b = ab.split([H, H], -1)
        if fused:
            o = chunk_gated_delta_rule(q, k, v, a, b, gate_params=GateParams(A_log, dt_bias, b_bias), qk_l2norm=True)[0]
        else:
            g = -torch.exp(A_log) * F.softplus(a.float() + dt_bias)
            o = chunk_gated_delta_rule(l2_normalize(q), l2_normalize(k), v, g, torch.sigmoid(b.float() + b_bias))[0]
        o.backward(torch.ones_like(o))

    unfused_ms, fused_ms = (time_ms(run, fused) for fused in (False, True))
    print(f"raw inputs B{B} T{T} HK{HK} H{H} D{D} fwd+bwd   un-fused {unfused_ms:.3f} ms   fused {fused_ms:.3f} ms")


def profile_fwd_bwd(B=4, T=4096, H=16, D=128):
    inputs = make(B, T, H, D, requires_grad=True)
    for name, fn in [("ours", chunk_gated_delta_rule), ("fla-core", fla_chunk)]:
        if fn is not None:
            print_kernel_table(f"{name} GDN fwd+bwd B{B} T{T} H{H} D{D}", lambda: fwd_bwd(fn)(*inputs))


def print_tuned_configs():
    """The config autotuning chose for each of our chunk kernels at the last shape it tuned (BV, warps, stages, cap)."""
    for name, kernel in vars(chunk_module).items():
        best = getattr(kernel, "best_config", None)  # set by the first tuning run
        if isinstance(kernel, triton.runtime.Autotuner) and best is not None:
            print(f"{'':44s} {name}: {best}")


def main():
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"fla-core {'installed' if fla_chunk is not None else 'not installed'}")
    if "--profile" in sys.argv[1:]:
        profile_fwd_bwd()
        return
    if "--raw-inputs" in sys.argv[1:]:
        for B, T, HK, H, D in [(8, 2048, 3, 9, 64), (4, 4096, 16, 16, 128)]:
            bench_raw_inputs(B, T, HK, H, D)
        return
    if "--models" not in sys.argv[1:]:  # --models: only the model shapes below, each call's limit spent on them
        bench_chunk("GDN", 4, 4096, 16, 128)
        print_tuned_configs()
        bench_step(64, 16, 128)  # early, so that a timeout on the long shapes below does not lose it
    if "--headline" in sys.argv[1:]:
        return
    # B * T fixed at 16K tokens (B = 1 at 32K); SmolLM2 first: fla-core's autotuning at the Llama shapes is slow.
    # The decode steps first of all: they take seconds, the chunk rows minutes.
    for B, H, D in [(64, 9, 64), (512, 9, 64), (64, 32, 64), (512, 32, 64)]:
        bench_step(B, H, D)
    for label, H, D in [("SmolLM2-135M", 9, 64), ("Llama-3.2-1B", 32, 64)]:
        for T in (2048, 8192, 32768):
            bench_chunk(label, max(1, 16384 // T), T, H, D)


if __name__ == "__main__":
    main()
