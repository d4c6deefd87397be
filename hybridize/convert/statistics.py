"""Per-head statistics of a teacher attention layer on calibration text, for the teacher-calibrated init.

The attention probabilities are recomputed from the captured attention input and the layer's own q/k weights
(RoPE from the teacher's rotary embedding), so nothing inside transformers is patched.
"""

from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

# Most heads park much of their probability on the first token (the attention sink): a no-op that reads nothing,
# not memory of 100s of tokens. The statistics describe the remaining mass, renormalized.
SINK_TOKENS = 1


@dataclass(frozen=True)
class HeadStatistics:
    """mean_distance [H]: expected t - s under each query head's attention, in tokens, averaged over queries.
    entropy [H]: the attention distribution's entropy divided by log(number of keys it could see), in [0, 1]:
    0 = one key per query (sharp lookup), 1 = uniform over the past (averaging)."""

    mean_distance: torch.Tensor
    entropy: torch.Tensor


@torch.no_grad()
def attention_probabilities(attention: dict[str, torch.Tensor], teacher_config, hidden: torch.Tensor,
                            position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(d)) per query head [B, H, T, T] in fp32, from the attention input [B, T, C]."""
    batch, length, _ = hidden.shape
    heads, kv_heads, dim = teacher_config.num_attention_heads, teacher_config.num_key_value_heads, teacher_config.head_dim
    x = hidden.float()
    q = (x @ attention["q_proj.weight"].float().T).view(batch, length, heads, dim).transpose(1, 2)  # [B, H, T, D]
    k = (x @ attention["k_proj.weight"].float().T).view(batch, length, kv_heads, dim).transpose(1, 2)  # [B, HK, T, D]
    cos, sin = (p.float() for p in position_embeddings)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(heads // kv_heads, dim=1)  # [B, H, T, D]
    scores = (q @ k.transpose(-1, -2)) * dim**-0.5  # [B, H, T, T]
    causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def head_statistics(probabilities: torch.Tensor) -> HeadStatistics:
    """Statistics of attention probabilities [B, H, T, T] (rows: queries, causal), the sink excluded."""
    length = probabilities.shape[-1]
    positions = torch.arange(length, device=probabilities.device, dtype=torch.float32)
    rest = probabilities[..., SINK_TOKENS:]  # [B, H, T, T - S]
    # Queries that see at least two non-sink keys: one key has no distance or entropy to speak of.
    rows = slice(SINK_TOKENS + 1, length)
    rest = rest[:, :, rows]
    rest = rest / rest.sum(-1, keepdim=True).clamp_min(1e-30)
    distance = (positions[rows, None] - positions[None, SINK_TOKENS:]).clamp_min(0)  # [T', T - S]
    mean_distance = (rest * distance).sum(-1)  # [B, H, T']
    visible = positions[rows] - SINK_TOKENS + 1  # non-sink keys each query sees, [T']
    entropy = -(rest * rest.clamp_min(1e-30).log()).sum(-1) / visible.log()  # [B, H, T']
    return HeadStatistics(mean_distance=mean_distance.mean((0, 2)), entropy=entropy.mean((0, 2)).clamp(0, 1))


def layer_statistics(attention: dict[str, torch.Tensor], teacher_config, hidden: torch.Tensor,
                     position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> HeadStatistics:
    """HeadStatistics of one teacher attention layer given its captured input [B, T, C]."""
    return head_statistics(attention_probabilities(attention, teacher_config, hidden, position_embeddings))
