"""Where the hybrid's fast decode step spends GPU time: kernels per generated token, replayed as a CUDA graph.

    python scripts/profile_decode.py HYBRID_DIR [--batch 16] [--context 8192]

The bench (`hybridize bench`) says how fast decoding is; this says why: at batch 1-16 a 135M hybrid's step is
hundreds of tiny kernels, so the count and the slowest few matter more than bandwidth.
"""

import argparse

import torch
from bench.kernel_profile import print_kernel_table

from hybridize.model.fast_decode import StaticDecoder
from hybridize.model import HybridForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hybrid")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    model = HybridForCausalLM.from_pretrained(args.hybrid, dtype=torch.bfloat16).cuda()
    decoder = StaticDecoder(model, args.batch, args.context + 2 * args.steps + 1)  # warm-up + profiled steps
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.context), device="cuda")
    decoder.prefill(prompt)
    print_kernel_table(f"decode, batch {args.batch}, context {args.context}, {args.steps} steps (CUDA graph replays)",
                       lambda: decoder.decode(args.steps), repeats=1, rows=30)


if __name__ == "__main__":
    main()
