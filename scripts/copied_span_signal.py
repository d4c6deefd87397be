"""How much of the teacher a student misses on copied spans, against the same positions of the text as read.

By default the student is the teacher with every layer a sliding window of its own attention (512 tokens + 4
sinks, exact within the window), so any KL to the teacher comes from attention past the window: the part a memory
branch or a recurrent layer would have to carry. `--student` measures a converted or distilled hybrid instead, to
see how much of that part it carries. Held-out blocks of the offline corpus (never in the library's training text)
get one copied span each (a stage's `copied_spans`, hybridize/distill/copied_spans.py); the KL is measured where
the next token lies inside the copy (after its first token), in the copied block and at the same positions of the
block as read.

    python scripts/copied_span_signal.py [--student FOLDER] [--seq-len 2048 --tokens 32 --min-gap 1024 --blocks 4]
        [--out signal.json]
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hybridize.model  # noqa: F401  (registers the hybrid with the Auto classes)
from hybridize.atomic import write_json_atomic
from hybridize.convert.build import convert_model
from hybridize.corpus import DOMAINS, token_blocks
from hybridize.device import pick_device
from hybridize.distill.copied_spans import copy_spans, span_draw
from hybridize.distill.recipe import CopiedSpans
from hybridize.teacher import load_teacher


def kl_per_position(teacher, student, ids: torch.Tensor) -> torch.Tensor:
    """[B, L] KL(teacher || student) of each position's next-token distribution, in nats."""
    with torch.no_grad():
        log_p = teacher(ids).logits.float().log_softmax(-1)
        log_q = student(ids).logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=32, help="span length")
    parser.add_argument("--min-gap", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=4, help="blocks per domain")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--teacher", default="smollm2-135m", help="alias or local Llama folder")
    parser.add_argument("--student", type=Path, help="a hybrid folder (default: the teacher's all-window copy)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args()

    device = pick_device(args.device)
    teacher, tokenizer = load_teacher(args.teacher, device=device)
    if args.student is None:
        student = convert_model(teacher, ["sliding_attention"] * teacher.config.num_hidden_layers,
                                sink_tokens=args.sinks)
    else:
        student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    student = student.to(device).eval()
    spans = CopiedSpans(share=1.0, tokens=args.tokens, min_gap=args.min_gap)
    rows = {}
    for domain in DOMAINS:
        blocks = token_blocks(tokenizer, domain, "heldout", args.seq_len, args.blocks)
        copied = copy_spans(blocks, 0, spans, seed=0)
        as_read, with_copy = (kl_per_position(teacher, student, ids.to(device)).cpu() for ids in (blocks, copied))
        inside = torch.zeros_like(blocks, dtype=torch.bool)
        for row in range(len(blocks)):
            _, target = span_draw(row, args.seq_len, spans, seed=0)
            inside[row, target : target + args.tokens - 1] = True  # position t predicts token t + 1
        rows[domain] = {"kl_copy_positions_as_read": as_read[inside].mean().item(),
                        "kl_copy_positions_copied": with_copy[inside].mean().item(),
                        "kl_block_as_read": as_read.mean().item(), "kl_block_copied": with_copy.mean().item()}
        print(domain, " ".join(f"{k} {v:.4f}" for k, v in rows[domain].items()), flush=True)
    if args.out:
        write_json_atomic(args.out, {"settings": {k: str(v) for k, v in vars(args).items()}, "domains": rows})


if __name__ == "__main__":
    main()
