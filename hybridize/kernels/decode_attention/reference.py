"""One-token attention over static KV slots in plain PyTorch: the fp32 ground truth for the split-KV Triton kernel."""

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def check_args(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
    """Shape checks shared by the reference and the Triton version."""
    if q.dim() != 4 or keys.dim() != 4:
        raise ValueError(f"q must be [B, Hkv, G, D] and keys [B, Hkv, S, D], got {tuple(q.shape)}, {tuple(keys.shape)}")
    B, Hkv, _, D = q.shape
    S = keys.shape[2]
    if tuple(keys.shape) != (B, Hkv, S, D) or values.shape != keys.shape:
        raise ValueError(f"keys and values must be [B={B}, Hkv={Hkv}, S, D={D}], got {tuple(keys.shape)}, "
                         f"{tuple(values.shape)}")
    if valid.dtype != torch.bool or tuple(valid.shape) != (B, S):
        raise ValueError(f"valid must be a bool [B={B}, S={S}] tensor, got {valid.dtype} {tuple(valid.shape)}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 inputs stay fp64; everything else is computed in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale q k^T over the valid slots) v for q [B, Hkv, G, D]; see decode_attention in __init__."""
    check_args(q, keys, values, valid)
    dt = compute_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = valid[:, None, None, :]  # [B, 1, 1, S]: the same for every head and query row
    logits = (q.to(dt) @ keys.to(dt).transpose(-1, -2)) * scale  # [B, Hkv, G, S]
    logits = logits.masked_fill(~mask, float("-inf"))
    peak = logits.amax(-1, keepdim=True)  # [B, Hkv, G, 1]
    # a row with no valid slot has peak -inf; shifting by 0 there keeps exp() at 0 instead of NaN
    weights = torch.exp(logits - peak.masked_fill(peak == float("-inf"), 0.0))  # [B, Hkv, G, S]
    total = weights.sum(-1, keepdim=True)  # [B, Hkv, G, 1]
    # invalid slots are ignored, whatever they hold (NaN included), as the kernel never loads them
    kept = values.to(dt).masked_fill(~valid[:, None, :, None], 0.0)  # [B, Hkv, S, D]
    out = (weights @ kept) / torch.where(total > 0, total, 1.0)  # [B, Hkv, G, D], 0 where no slot is valid
    return out.to(q.dtype)


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, sink_slot: torch.Tensor) -> torch.Tensor:
    """One decode token's attention inputs into static slots; see rope_store in __init__. The rotation is
    transformers' Llama RoPE, computed in fp32."""
    dt = compute_dtype(q)
    q_rot, k_rot = apply_rotary_pos_emb(q.to(dt), k.to(dt), cos.to(dt), sin.to(dt))  # cos, sin [B, D] -> [B, 1, D]
    k_rot, v = k_rot.to(keys.dtype), v.to(values.dtype)  # [B, Hkv, D] each
    keys.index_copy_(2, slot, k_rot[:, :, None])
    values.index_copy_(2, slot, v[:, :, None])
    # Every row is written, with a where() keeping what a row without a sink slot holds: no data-dependent shapes,
    # so a decode step on this path can still be captured as a CUDA graph.
    rows = torch.arange(k.shape[0], device=k.device)
    is_sink = (sink_slot >= 0)[:, None, None]  # [B, 1, 1]
    where = sink_slot.clamp(min=0)  # [B]
    keys[rows, :, where] = torch.where(is_sink, k_rot, keys[rows, :, where])
    values[rows, :, where] = torch.where(is_sink, v, values[rows, :, where])
    return q_rot.to(q.dtype)
