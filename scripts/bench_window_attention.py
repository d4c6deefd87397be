"""Benchmark one sliding-window attention op on a CUDA GPU: compiled flex attention (what the model runs in training
and a first prefill) against SDPA with the dense window mask (the fallback) and full causal SDPA (a teacher layer).

    python scripts/bench_window_attention.py [--window 512]

Llama-3.2-1B heads (32 query, 8 KV, head dim 64), bf16. Prints ms (median of triton.testing.do_bench, after a
warm-up call that compiles) and each path's time as a multiple of flex's.
"""

import argparse

import torch
import torch.nn.functional as F
import triton

from hybridize.model.attention import attention_mask_for, sliding_window_attention

HEADS, KV_HEADS, DIM = 32, 8, 64


def timed(fn, backward: bool, *inputs) -> float:
    def step():
        out = fn(*inputs)
        if backward:
            out.backward(torch.ones_like(out))

    step()  # compiles flex, builds its block mask
    return triton.testing.do_bench(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args()
    window = args.window
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, window {window}, "
          f"H{HEADS}/{KV_HEADS} D{DIM} bf16")
    for label, batch, length, backward in [("prefill", 16, 8128, False), ("prefill", 16, 960, False),
                                           ("train fwd+bwd", 4, 8192, True)]:
        def make(heads):
            return torch.randn(batch, heads, length, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=backward)

        q, k, v = make(HEADS), make(KV_HEADS), make(KV_HEADS)
        slots = torch.arange(length, device="cuda")
        mask = attention_mask_for(slots, slots, window, None)  # [1, 1, T, T]
        paths = {
            "flex": lambda q, k, v: sliding_window_attention(q, k, v, window),
            "sdpa+mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
            "full causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        }
        with torch.set_grad_enabled(backward):
            ms = {name: timed(fn, backward, q, k, v) for name, fn in paths.items()}
        cells = "   ".join(f"{name} {t:7.3f} ms ({t / ms['flex']:4.1f}x)" for name, t in ms.items())
        print(f"{label:14s} B{batch:<3d} T{length:<6d} {cells}")


if __name__ == "__main__":
    main()
