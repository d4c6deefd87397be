"""One-token attention over static KV slots (the decode step of full and sliding-window attention), and the step's
RoPE and slot writes before it.

`backend="auto"` runs the Triton kernels (split-KV attention; one launch for RoPE and the writes) on CUDA tensors and
the fp32 PyTorch references otherwise; see kernels/backend.py.
"""

import torch

from ..backend import resolve_backend
from . import reference, split_kv, store


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


def rope_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot: torch.Tensor,
    sink_slot: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode token's attention inputs, before decode_attention: RoPE on q and k, k and v into their slots.

    q: [B, H, D]; k, v: [B, Hkv, D] (any batch stride: views of the step's projections), before RoPE; cos, sin:
    [B, D], each row's rotary tables at its position (Llama's rotate-half form, D even). keys, values: [B, Hkv, S,
    D], written in place: the rotated k and v go to slot `slot` ([1] int64, the ring slot) of every row, and also to
    slot sink_slot[b] of row b where sink_slot [B] int64 is >= 0 (the row's token is one of its sinks). Returns the
    rotated q [B, H, D] in q's dtype; the rotation is computed in fp32.
    """
    fn = store.rope_store if resolve_backend(backend, q) == "triton" else reference.rope_store
    return fn(q, k, v, cos, sin, keys, values, slot, sink_slot)


__all__ = ["decode_attention", "rope_store"]
