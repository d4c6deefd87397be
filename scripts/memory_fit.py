"""What each window + memory layer's memory would add if opened: the layer's error against the teacher's attention
output past the window, with the window alone and with window + memory (memory_scale 1), on held-out text.

Each layer reads the teacher's captured attention input (teacher-forced, as conversion fits it), on the first
held-out block of each domain at twice the window's length (conversion fits on the second blocks). A memory whose
output is zero adds nothing and, at memory_scale 0, can never be opened by training (docs/conversion.md).

    python scripts/memory_fit.py HYBRID [--teacher NAME]   # one JSON row per layer, then the means
"""

import argparse
import json
import statistics
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hybridize.convert.plan import has_window_memory
from hybridize.corpus import calibration_batch
from hybridize.model.configuration_hybrid import WINDOW_MEMORY_TYPES
from hybridize.teacher import load_teacher
from hybridize.teacher_forcing import capture_mixer_io, teacher_forced_context


def relative_error(output: torch.Tensor, target: torch.Tensor) -> float:
    return ((output - target).norm() / target.norm()).item()


@torch.no_grad()
def memory_fit(hybrid, teacher, input_ids: torch.LongTensor) -> list[dict]:
    layers = [i for i, kind in enumerate(hybrid.config.layer_types) if kind in WINDOW_MEMORY_TYPES]
    captured = capture_mixer_io(teacher, input_ids, layers)
    past = slice(hybrid.config.sliding_window, None)  # positions some of whose keys the window no longer sees
    rows = []
    for i in layers:
        hidden, target = captured[i]
        mixer = hybrid.model.layers[i].mixer
        context = teacher_forced_context(hybrid, hidden)
        window, memory = mixer.window(hidden, context)[:, past], mixer.memory(hidden, context)[:, past]
        target = target[:, past]
        rows.append({"layer": i, "window": relative_error(window, target),
                     "window_memory": relative_error(window + memory, target),
                     "memory_norm": (memory.norm() / target.norm()).item()})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hybrid", help="a converted (or distilled) hybrid folder")
    parser.add_argument("--teacher", default=None, help="the teacher (default: the embedded SmolLM2)")
    args = parser.parse_args()
    if not has_window_memory(AutoConfig.from_pretrained(args.hybrid).layer_types):
        print(f"memory_fit: {args.hybrid} has no window + memory layer", file=sys.stderr)
        return 2
    hybrid = AutoModelForCausalLM.from_pretrained(args.hybrid, dtype=torch.float32).eval()
    teacher, tokenizer = load_teacher(args.teacher)
    input_ids = calibration_batch(tokenizer, seq_len=2 * hybrid.config.sliding_window, blocks_per_domain=1)
    rows = memory_fit(hybrid, teacher, input_ids)
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({key: statistics.mean(row[key] for row in rows) for key in ("window", "window_memory",
                                                                                 "memory_norm")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
