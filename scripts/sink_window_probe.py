"""Probe: would sliding windows that also keep the first S tokens ("sinks") keep passkey recall? A measurement on a
converted (untrained) hybrid, not a feature: the model has no sink windows yet (docs/results.md, third pass).

    python scripts/sink_window_probe.py HYBRID --sinks 1 [-- hybridize eval arguments]

Emulated in this process only: every sliding layer's generate() cache keeps all its keys (transformers' DynamicLayer
instead of the window-trimming one), and the attention mask lets a query see, besides its window, the first S real
tokens of its row. On the CPU every windowed attention goes through that mask (the flex path is CUDA-only). Then
`hybridize eval HYBRID ...` runs as usual.
"""

import argparse
import sys

import torch
from transformers.cache_utils import DynamicLayer

from hybridize.cli import main as hybridize_main
from hybridize.model import attention, cache


def with_sinks(sinks: int):
    dense_mask = attention.attention_mask_for

    def mask(query_slots, key_slots, window, key_valid):
        allowed = dense_mask(query_slots, key_slots, window, key_valid)  # [B or 1, 1, Tq, Tk]
        if window is None or sinks == 0:
            return allowed
        # rank of each key among its row's real tokens; keys start at slot 0 here (the caches keep every key)
        valid = torch.ones_like(key_slots)[None] if key_valid is None else key_valid.long()  # [B or 1, Tk]
        sink = (valid.cumsum(-1) <= sinks) & valid.bool()  # [B or 1, Tk]
        causal = query_slots[:, None] >= key_slots[None, :]  # [Tq, Tk]
        return allowed | (sink[:, None, None, :] & causal[None, None])

    return mask


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hybrid")
    parser.add_argument("--sinks", type=int, required=True)
    argv = sys.argv[1:]
    ours, eval_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser.parse_args(ours)
    full_layer_cache = cache._layer_cache
    cache._layer_cache = lambda config, kind: DynamicLayer() if kind == "sliding_attention" else full_layer_cache(
        config, kind)
    attention.attention_mask_for = with_sinks(args.sinks)
    return hybridize_main(["eval", args.hybrid, *eval_args])


if __name__ == "__main__":
    sys.exit(main())
