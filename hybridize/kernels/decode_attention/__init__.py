"""One-token attention over static KV slots (the decode step of full and sliding-window attention).

`backend="auto"` runs the split-KV Triton kernel on CUDA tensors and the fp32 PyTorch reference otherwise;
see kernels/backend.py.
"""

import torch

from ..backend import resolve_backend
from . import reference, split_kv


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(scale q k^T) v over the valid slots, for one new token per sequence.

    q: [B, Hkv, G, D], the G query heads that share a KV head as G rows; keys, values: [B, Hkv, S, D];
    valid: [B, S] bool, the slots that hold a real token (the mask depends on the key only). scale defaults
    to D ** -0.5. Returns [B, Hkv, G, D] in q's dtype; a row with no valid slot is 0.
    """
    fn = split_kv.decode_attention if resolve_backend(backend, q) == "triton" else reference.decode_attention
    return fn(q, keys, values, valid, scale=scale)


__all__ = ["decode_attention"]
