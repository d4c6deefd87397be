"""Where a sliding window's missing attention mass goes, per teacher layer: how much of each query's attention lies
further back than the window, and how much of that is on the first token (an attention sink).

    python scripts/window_mass.py [--window 512] [--seq-len 2048]   # the embedded teacher, CPU, about a minute

Reads one held-out block per corpus domain; averages over heads, blocks and the queries past the window.
"""

import argparse

import torch

from hybridize.corpus import DOMAINS, token_blocks
from hybridize.teacher import load_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    model, tokenizer = load_teacher(None, dtype=torch.float32)
    model.set_attn_implementation("eager")  # the probabilities are only materialized by eager attention
    ids = torch.cat([token_blocks(tokenizer, domain, "heldout", args.seq_len, 1) for domain in DOMAINS])
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions  # per layer [B, H, T, T]
    queries = torch.arange(args.window, args.seq_len)[:, None]
    outside = (queries - torch.arange(args.seq_len)[None, :]) >= args.window  # [Tq, T]
    print("layer  outside-window  on-first-token  first-token share")
    for layer, probs in enumerate(attentions):
        probs = probs[:, :, args.window:]  # [B, H, Tq, T]: queries that have keys beyond the window
        far = (probs * outside).sum(-1).mean().item()
        first = probs[..., 0].mean().item()
        print(f"{layer:5d}  {far:14.3f}  {first:14.3f}  {first / max(far, 1e-9):17.2f}")


if __name__ == "__main__":
    main()
