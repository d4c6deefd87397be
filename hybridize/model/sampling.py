"""Choosing the next token from logits: greedy, or sampled (temperature, top-k, top-p) by inverse CDF from given uniforms.

Sampling reads its randomness from a uniform number per row instead of a generator, so a decode step holds no
RNG state: the same uniforms give the same tokens in the CUDA-graph step, in the model's own cache loop and
in a plain forward over the whole sequence, and whoever supplies the uniforms owns the reproducibility.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy (the uniforms are not read)
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1: no nucleus cut

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def choose_tokens(logits: torch.Tensor, uniforms: torch.Tensor | None, sampling: Sampling) -> torch.Tensor:
    """logits [B, V], uniforms [B] in [0, 1) -> tokens [B, 1].

    The sampled token is the first whose cumulative probability exceeds u times the total: the distribution
    softmax(logits / temperature), restricted to the top_k most likely tokens and to the smallest set whose
    probability reaches top_p, without renormalizing (the scaled u does that). Only static shapes: it runs
    inside a captured decode step.
    """
    if sampling.greedy:
        return logits.argmax(-1, keepdim=True)
    scaled = logits.float() / sampling.temperature  # [B, V]
    if sampling.top_k:
        kth = scaled.topk(min(sampling.top_k, scaled.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [B, V]
    if sampling.top_p < 1:
        ordered, order = probs.sort(dim=-1, descending=True)  # [B, V] each
        before = ordered.cumsum(-1) - ordered  # [B, V] probability of the more likely tokens
        # a token stays while the more likely ones have not reached top_p yet (the most likely always stays)
        probs = probs.scatter(-1, order, ordered.masked_fill(before >= sampling.top_p, 0.0))
    cdf = probs.cumsum(-1)  # [B, V]
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]  # [B, 1]
    # right=True: a token of probability 0 (a flat step of the cdf) is never the first to exceed the target
    return torch.searchsorted(cdf, target, right=True).clamp_max(logits.shape[-1] - 1)
