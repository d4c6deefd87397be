"""Time the split-KV decode attention against F.scaled_dot_product_attention (the path it replaced), bf16, CUDA.

Usage: python scripts/bench_decode_attention.py
Per shape (q [B, Hkv, G, D] against S cached slots, all valid): ms of each (median of triton.testing.do_bench),
ours / SDPA, each / the byte floor (K and V read once, q read and the output written once, at 3.0 TB/s), and the
largest difference between the two outputs.
"""

import torch
import torch.nn.functional as F
import triton

from hybridize.kernels.decode_attention import decode_attention

PEAK_BYTES_PER_S = 3.0e12
# (name, B, Hkv, G, D): SmolLM2-135M and Llama-3.2-1B attention
MODELS = [("smollm2", 16, 3, 3, 64), ("llama3.2-1b", 16, 8, 4, 64)]
LENGTHS = (1024, 8192, 32768)


def shapes():
    for name, B, Hkv, G, D in MODELS:
        for S in LENGTHS:
            yield name, B, Hkv, G, D, S
    yield "smollm2", 1, 3, 3, 64, 8192


def main():
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_attention needs a CUDA GPU")
    dev, dt = "cuda", torch.bfloat16
    print(f"{'shape':36s} {'ours ms':>8s} {'sdpa ms':>8s} {'ours/sdpa':>9s} {'ours/floor':>10s} {'sdpa/floor':>10s} "
          f"{'max |diff|':>10s}")
    for name, B, Hkv, G, D, S in shapes():
        q = torch.randn(B, Hkv, G, D, device=dev, dtype=dt)
        keys, values = (torch.randn(B, Hkv, S, D, device=dev, dtype=dt) for _ in range(2))
        valid = torch.ones(B, S, device=dev, dtype=torch.bool)
        mask = valid[:, None, None, :]
        ours = triton.testing.do_bench(lambda: decode_attention(q, keys, values, valid), return_mode="median")
        sdpa = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask),
                                       return_mode="median")
        n_bytes = 2 * keys.numel() * keys.element_size() + 2 * q.numel() * q.element_size() + valid.numel()
        floor = n_bytes / PEAK_BYTES_PER_S * 1e3
        diff = (decode_attention(q, keys, values, valid) - F.scaled_dot_product_attention(q, keys, values,
                                                                                        attn_mask=mask)).abs().max()
        shape = f"{name} B{B} Hkv{Hkv} G{G} D{D} S{S}"
        print(f"{shape:36s} {ours:8.4f} {sdpa:8.4f} {ours / sdpa:9.2f} {ours / floor:10.2f} {sdpa / floor:10.2f} "
              f"{diff.item():10.2e}")


if __name__ == "__main__":
    main()
