"""Copied spans: training blocks in which a span of their own text recurs further on (a stage's `copied_spans`).

A converted recurrent or window + memory layer learns retrieval only where the teacher's prediction depends on text
far back, and in natural training text that is rare: on SmolLM2's held-out text, 512-token windows miss 0.02-0.25
nats/token of the teacher at some positions of the text as read, but 0.77-1.54 at the same positions when they hold
the second occurrence of a 32-token span copied 1K+ tokens further on, where the teacher reads the first
(docs/runs/copied-span-signal_cpu_2026-12-07.md). So a share of the training blocks get one span of `tokens` tokens
copied over the text at least `min_gap` tokens after it; the stage's loss is unchanged, and the teacher predicts the
copy as it would any repeated text. This is the text's own content, not the format of a recall eval. Which block
gets a span, and where, depends only on the run's seed and the block's position in the training stream, so a
resumed run or one on more processes sees the same blocks.
"""

import random

import torch

from .recipe import CopiedSpans

# The draw's generator seed: the run's seed in the high bits, the stream position in the low ones (random.Random
# uses every bit of an int seed; torch's CPU generator keeps only 32).
POSITION_BITS = 40


def span_draw(position: int, seq_len: int, spans: CopiedSpans, seed: int) -> tuple[int, int] | None:
    """(source, target) starts of the span copied in the block at stream `position`, or None for an unchanged block.

    The source start is uniform over where a span, the gap and its copy fit; the copy's start is uniform over what
    lies at least `min_gap` tokens after the span's end."""
    generator = random.Random((seed << POSITION_BITS) + position)
    if generator.random() >= spans.share:
        return None
    length, gap = spans.tokens, spans.min_gap
    source = generator.randint(0, seq_len - 2 * length - gap)
    target = generator.randint(source + length + gap, seq_len - length)
    return source, target


def copy_spans(blocks: torch.Tensor, start: int, spans: CopiedSpans, seed: int) -> torch.Tensor:
    """blocks [B, L], the stream positions start..start + B - 1: a copy in which each drawn block's span recurs."""
    copied = blocks.clone()
    length = spans.tokens
    for row in range(blocks.shape[0]):
        draw = span_draw(start + row, blocks.shape[1], spans, seed)
        if draw is not None:
            source, target = draw
            copied[row, target : target + length] = blocks[row, source : source + length]
    return copied
