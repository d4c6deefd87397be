"""SequenceContext: what every token mixer may need about the current forward, passed as one object."""

from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@dataclass
class SequenceContext:
    """position_embeddings: RoPE (cos, sin) [B, T, D], used by attention (and by recurrent mixers with
    recurrent_rope); None when no layer rotates.
    attention_mask: [B, past_tokens + T] with 0 at left padding, or None when nothing is padded.
    past_tokens: tokens already in the cache before this forward.
    """

    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    attention_mask: torch.Tensor | None
    past_tokens: int

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k [B, T, H, D] (heads before dims, as the recurrent mixers hold them) rotated by this forward's RoPE, in
        their own dtype: cos and sin follow the embeddings' dtype, fp32 under autocast, and a recurrence needs q, k in
        v's dtype."""
        cos, sin = self.position_embeddings
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        return q_rot.to(q.dtype), k_rot.to(k.dtype)

    @property
    def new_tokens_mask(self) -> torch.Tensor | None:
        """[B, T] mask of the tokens in this forward, or None."""
        return None if self.attention_mask is None else self.attention_mask[:, self.past_tokens :]


def real_token_rank(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] mask (0 at left padding) -> [B, T] each slot's index among its row's real tokens (-1 before the
    first): the RoPE position of a real token, and what a window's sinks are counted by."""
    return attention_mask.long().cumsum(-1) - 1
