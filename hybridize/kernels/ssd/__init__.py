"""Mamba2 SSD (scalar per-head decay linear recurrence): chunked prefill/training and the decode step.

`chunk_ssd` and `ssd_step` take `backend=` ("auto", "triton" or "reference"); `recurrent_ssd` is the
token-by-token PyTorch ground truth. Shapes and math: README.md.
"""

from typing import Optional, Tuple

import torch

from ..backend import check_one_dtype, resolve_backend
from . import chunk, layer_step, recurrent, reference
from .reference import recurrent_ssd

__all__ = ["chunk_ssd", "ssd_step", "ssd_layer_step", "recurrent_ssd"]


def chunk_ssd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t over whole sequences, chunk by chunk.

    Args:
        q, k: [B, T, G, N]; head h reads group h // (H // G).
        v: [B, T, H, P].
        g: [B, T, H] log decay (<= 0).
        scale: defaults to N ** -0.5.
        initial_state: [Nseq, H, N, P] or None (zeros).
        output_final_state: also return the state after the last token.
        cu_seqlens: [Nseq + 1] packed-sequence starts (then B == 1), or None (Nseq = B).
        chunk_size: tokens per chunk (the Triton backend needs a power of two >= 16).
        backend: "auto" (Triton on CUDA tensors), "triton" or "reference".
    Returns:
        o [B, T, H, P] in v's dtype, and the final state [Nseq, H, N, P] fp32 or None.
    """
    check_one_dtype(q, k, v)
    impl = chunk if resolve_backend(backend, q) == "triton" else reference
    return impl.chunk_ssd(
        q, k, v, g,
        scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size,
    )


def ssd_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode token: state <- exp(g) state + k v^T (in place), o = scale * state^T q.

    Args:
        q, k: [B, G, N]; v: [B, H, P]; g: [B, H]; state: [B, H, N, P] fp32, updated in place.
        backend: "auto" (Triton on CUDA tensors), "triton" or "reference".
    Returns:
        o [B, H, P] in v's dtype.
    """
    impl = recurrent if resolve_backend(backend, q) == "triton" else reference
    return impl.ssd_step(q, k, v, g, state, scale=scale)


def ssd_layer_step(
    xbc: torch.Tensor,
    dt: torch.Tensor,
    z: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor,
    conv_state: torch.Tensor,
    state: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    D: torch.Tensor,
    norm_weight: torch.Tensor,
    *,
    groups: int,
    scale: Optional[float] = None,
    norm_eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode token of a Mamba2 layer between its projections: short conv + SiLU of xbc (conv_state updated in
    place), dt and the decay from the raw dt, the SSD step (state updated in place), the D skip and the gated RMSNorm;
    see `layer_step.ssd_layer_step` for shapes.

    backend: "auto" (Triton on CUDA tensors, else the reference), "triton" or "reference".
    """
    impl = layer_step if resolve_backend(backend, xbc) == "triton" else reference
    return impl.ssd_layer_step(xbc, dt, z, conv_weight, conv_bias, conv_state, state, A_log, dt_bias, D, norm_weight,
                               groups=groups, scale=scale, norm_eps=norm_eps)
