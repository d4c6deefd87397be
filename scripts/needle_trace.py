"""Where a hybrid loses a passkey: the number's footprint per layer, from the needle to the question.

    python scripts/needle_trace.py runs/smollm2-135m-gdn/final --length 1024 --out trace.json
    HYBRIDIZE_KERNELS=reference python scripts/needle_trace.py ...   # the same on the fp32 PyTorch references

Prints one row per layer: its type, the recurrent state's footprint just after the needle and at the question, the
longest half-life of its heads at a zero gate input, the most its decays keep of the needle's last write by the
question (log10), the most attention a head puts on the number from the last token, and the residual stream's
footprint at the question, the last two for the hybrid and its teacher (hybridize/evaluate/needle_trace.py).
"""

import argparse
import json
import sys

import torch

from hybridize.evaluate.common import format_table, load_pair, pick_dtype
from hybridize.evaluate.needle_trace import needle_trace


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hybrid")
    parser.add_argument("--teacher", default=None, help="default: the one the hybrid records")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--depth", type=float, default=0.25)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--out", help="write both traces here as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    student, teacher, tokenizer, _ = load_pair(args.hybrid, args.teacher, dtype=pick_dtype(args.dtype, device),
                                               device=device)
    traces = {name: needle_trace(model, tokenizer, args.length, args.depth, args.chunk)
              for name, model in (("hybrid", student), ("teacher", teacher))}
    hybrid, rows = traces["hybrid"], traces["hybrid"]["rows"]
    after = next(row for row in rows if row["tokens"] >= hybrid["needle"][1])
    teacher = traces["teacher"]
    table = [[i, kind, after["state"][i], rows[-1]["state"][i],
              None if hybrid["half_life"][i] is None else max(hybrid["half_life"][i]), rows[-1]["decay_kept"][i],
              hybrid["needle_attention"][i], teacher["needle_attention"][i],
              rows[-1]["residual"][i], teacher["rows"][-1]["residual"][i]]
             for i, kind in enumerate(hybrid["layer_types"])]
    print(f"number at tokens {hybrid['needle']}, question at the end of {args.length}")
    print(format_table(["layer", "type", f"state @{after['tokens']}", "state @end", "longest half-life",
                        "log10 decay kept @end", "attention on number", "teacher's", "residual @end",
                        "teacher residual @end"], table))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(traces, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
