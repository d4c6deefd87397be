"""Time the short conv and the gated RMSNorm (bf16, CUDA) against fla-core and torch eager, with the byte floor.

Usage: python scripts/bench_conv_norm.py
Prints, per op and pass (fwd, fwd+bwd): ms (median of triton.testing.do_bench), ratio to fla-core ("n/a" when
fla is not installed or refuses to run) and ratio to the ideal-byte floor (each tensor read once and written once
at 3.0 TB/s).
"""

import torch
import torch.nn.functional as F
import triton

from hybridize.kernels.conv1d import causal_conv1d
from hybridize.kernels.norm import gated_rms_norm

PEAK_BYTES_PER_S = 3.0e12


def fla_ops():
    """fla-core's causal_conv1d and rms_norm_gated, or None where the installed version lacks them."""
    conv = norm = None
    try:
        from fla.modules.convolution import causal_conv1d as conv
    except ImportError:
        pass
    try:
        from fla.modules.fused_norm_gate import rms_norm_gated as norm
    except ImportError:
        pass
    return conv, norm


def bench(name, fn, leaves, backward):
    """Median ms of fn() (and of a backward through it), or None if it raises."""
    def run():
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))

    try:
        run()
        return triton.testing.do_bench(run, grad_to_none=leaves, return_mode="median")
    except Exception as e:  # the peer may refuse this Triton version; report it, keep benchmarking ours
        lines = "\n    ".join(str(e).splitlines()[:5])  # a CompilationError's first line is only its location
        print(f"  ({name} failed: {type(e).__name__}: {lines})")
        return None


def report(title, impls, leaves, fwd_bytes, fwd_bwd_bytes):
    print(f"\n{title}")
    print(f"  {'pass':8s} {'impl':10s} {'ms':>8s} {'/fla':>7s} {'/floor':>7s}")
    for name, backward, n_bytes in (("fwd", False, fwd_bytes), ("fwd+bwd", True, fwd_bwd_bytes)):
        times = {impl: (bench(impl, fn, leaves, backward) if fn is not None else None) for impl, fn in impls.items()}
        floor_ms = n_bytes / PEAK_BYTES_PER_S * 1e3
        for impl, ms in times.items():
            if ms is None:
                print(f"  {name:8s} {impl:10s} {'n/a':>8s}")
                continue
            peer = f"{ms / times['fla']:7.2f}" if times.get("fla") else f"{'n/a':>7s}"
            print(f"  {name:8s} {impl:10s} {ms:8.3f} {peer} {ms / floor_ms:7.2f}")
        print(f"  {name:8s} {'floor':10s} {floor_ms:8.3f}")


def main():
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    fla_conv, fla_norm = fla_ops()
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
          f"fla {'found' if fla_conv or fla_norm else 'not installed'}")

    # Gated DeltaNet's q, k, v short conv: width 4, SiLU, no bias.
    B, T, D, W = 4, 4096, 2048 * 3, 4
    x = torch.randn(B, T, D, device=dev, dtype=dt, requires_grad=True)
    w = torch.randn(D, W, device=dev, dtype=dt, requires_grad=True)
    tensor_bytes = x.numel() * x.element_size()
    report(
        f"causal_conv1d B{B} T{T} D{D} W{W} silu",
        {
            "ours": lambda: causal_conv1d(x, w, activation="silu")[0],
            "fla": (lambda: fla_conv(x=x, weight=w, activation="silu")[0]) if fla_conv else None,
            "eager": lambda: F.silu(F.conv1d(x.transpose(1, 2), w.unsqueeze(1), padding=W - 1, groups=D)[..., :T])
            .transpose(1, 2),
        },
        [x, w],
        fwd_bytes=2 * tensor_bytes,  # read x, write y
        fwd_bwd_bytes=5 * tensor_bytes,  # + read x, dy, write dx
    )

    # Gated DeltaNet's output norm: RMSNorm over the head dim, gated by silu(g).
    B, T, H, K = 4, 4096, 16, 128
    o = torch.randn(B, T, H, K, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(B, T, H, K, device=dev, dtype=dt, requires_grad=True)
    nw = torch.ones(K, device=dev, dtype=dt, requires_grad=True)
    tensor_bytes = o.numel() * o.element_size()
    report(
        f"gated_rms_norm B{B} T{T} H{H} D{K}",
        {
            "ours": lambda: gated_rms_norm(o, g, nw),
            "fla": (lambda: fla_norm(x=o, g=g, weight=nw, bias=None, activation="swish", eps=1e-6))
            if fla_norm else None,
            "eager": lambda: gated_rms_norm(o, g, nw, backend="reference"),
        },
        [o, g, nw],
        fwd_bytes=3 * tensor_bytes,  # read x, g, write y
        fwd_bwd_bytes=8 * tensor_bytes,  # + read x, g, dy, write dx, dg
    )


if __name__ == "__main__":
    main()
