"""Time the Triton Mamba2 SSD kernels against fla-core's simple_gla (if installed), bf16 on one CUDA GPU.

Prints ms (median of triton.testing.do_bench), ours / peer, and ours / ideal-byte floor (every input byte read
once and every output byte written once, at 3.0e12 B/s). The peer needs q and k expanded to H heads; the
expansion is done before timing.

    python scripts/bench_ssd.py
"""

import torch
import torch.nn.functional as F
import triton

from hybridize.kernels.ssd import chunk_ssd, ssd_step

try:
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
except ImportError:
    chunk_simple_gla = fused_recurrent_simple_gla = None
else:
    # TIMING ONLY: fla-core 0.6.0 raises in chunk_bwd_dqkwg when g is given on Hopper with 3.4.0 <= Triton < 3.7.1
    # (its module-level TRITON_ABOVE_3_7_1 is False there; see fla issue #640). fla's gated gradients are WRONG
    # under these Triton versions; we clear the guard only so that its backward can be timed, never compared.
    import fla.ops.common.chunk_o as _fla_chunk_o
    _fla_chunk_o.TRITON_ABOVE_3_7_1 = True

COPY_BYTES_PER_S = 3.0e12


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def peer_ms(fn):
    """bench_ms(fn), or None (printed as n/a) when fn is None or the peer fails on this case."""
    if fn is None:
        return None
    try:
        return bench_ms(fn)
    except Exception as e:  # noqa: BLE001 - a peer's failure is reported, not fatal
        print(f"  peer failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}")
        return None


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def report(name: str, ours: float, peer, floor_bytes: int) -> None:
    floor = floor_bytes / COPY_BYTES_PER_S * 1e3
    peer_str = "n/a" if peer is None else f"{peer:8.3f}"
    ratio = "n/a" if peer is None else f"{ours / peer:6.2f}"
    print(f"{name:<46} {ours:8.3f} {peer_str:>8} {ratio:>7} {ours / floor:7.2f}")


def bench_chunk(name: str, B: int, T: int, G: int, H: int, N: int, P: int) -> None:
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, T, G, N, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(B, T, G, N, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(B, T, H, P, device=dev, dtype=dt, requires_grad=True)
    g = F.logsigmoid(torch.randn(B, T, H, device=dev) + 2.0).requires_grad_()
    do = torch.randn_like(v)
    scale = N**-0.5
    inputs = (q, k, v, g)
    fwd_bytes = nbytes(q, k, v, g, do)  # do stands in for o, which has its shape and dtype
    bwd_bytes = 2 * nbytes(q, k, v, g) + nbytes(do)  # read q, k, v, g, do; write dq, dk, dv, dg

    def ours():
        return chunk_ssd(q, k, v, g, scale=scale)[0]

    peer = None
    if chunk_simple_gla is not None:
        qh = q.detach().repeat_interleave(H // G, dim=2).requires_grad_()
        kh = k.detach().repeat_interleave(H // G, dim=2).requires_grad_()

        def peer():
            return chunk_simple_gla(qh, kh, v, g, scale=scale, initial_state=None, output_final_state=False)[0]

        try:
            diff = (ours().float() - peer().float()).norm() / peer().float().norm()
            print(f"{name}: relative difference ours vs peer output {diff.item():.1e}")
        except Exception as e:  # noqa: BLE001
            print(f"{name}: peer failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}")

    def fwd_bwd(fn, leaves):
        def step():
            fn().backward(do)
            for x in leaves:
                x.grad = None
        return step

    with torch.no_grad():
        fwd = bench_ms(ours), peer_ms(peer)
    report(f"{name} fwd", fwd[0], fwd[1], fwd_bytes)
    ours_fb = bench_ms(fwd_bwd(ours, inputs))
    peer_fb = None if peer is None else peer_ms(fwd_bwd(peer, (qh, kh, v, g)))
    report(f"{name} fwd+bwd", ours_fb, peer_fb, fwd_bytes + bwd_bytes)


def bench_step(name: str, B: int, G: int, H: int, N: int, P: int) -> None:
    dev, dt = "cuda", torch.bfloat16
    q, k = torch.randn(B, G, N, device=dev, dtype=dt), torch.randn(B, G, N, device=dev, dtype=dt)
    v = torch.randn(B, H, P, device=dev, dtype=dt)
    g = F.logsigmoid(torch.randn(B, H, device=dev) + 2.0)
    state = torch.randn(B, H, N, P, device=dev)
    floor_bytes = nbytes(q, k, v, g) + 2 * nbytes(state) + nbytes(v)  # read all, write state and o

    peer = None
    if fused_recurrent_simple_gla is not None:
        qh, kh = (x.repeat_interleave(H // G, dim=1)[:, None] for x in (q, k))  # [B, 1, H, N]
        peer_state = state.clone()

        def peer():
            return fused_recurrent_simple_gla(
                q=qh, k=kh, v=v[:, None], g=g[:, None], initial_state=peer_state, output_final_state=True
            )

    ours = bench_ms(lambda: ssd_step(q, k, v, g, state))
    report(f"{name} decode step", ours, peer_ms(peer), floor_bytes)


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}, peer: "
          f"{'fla-core chunk_simple_gla' if chunk_simple_gla else 'n/a (fla not installed)'}")
    print(f"{'case':<46} {'ours ms':>8} {'peer ms':>8} {'/peer':>7} {'/floor':>7}")
    bench_chunk("B4 T4096 H32 N128 P64", 4, 4096, 32, 32, 128, 64)
    # decode steps early, so that a timeout on the long shapes below does not lose them
    bench_step("B64 H32 N128 P64", 64, 32, 32, 128, 64)
    bench_step("Llama-3.2-1B B64 H32 G8 N=P=64", 64, 8, 32, 64, 64)
    bench_step("SmolLM2 B64 H9 G3 N=P=64", 64, 3, 9, 64, 64)
    for T in (2048, 8192, 32768):
        bench_chunk(f"Llama-3.2-1B H32 G8 N=P=64 B{32768 // T} T{T}", 32768 // T, T, 8, 32, 64, 64)
        bench_chunk(f"SmolLM2 H9 G3 N=P=64 B{32768 // T} T{T}", 32768 // T, T, 3, 9, 64, 64)


if __name__ == "__main__":
    main()
