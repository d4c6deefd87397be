"""Gated delta rule (Gated DeltaNet) op: chunked training/prefill form and decode step, Triton or PyTorch reference."""

import torch

from hybridize.kernels.backend import resolve_backend
from hybridize.kernels.gated_delta import chunk, recurrent, reference
from hybridize.kernels.gated_delta.reference import recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "gated_delta_step", "recurrent_gated_delta_rule"]


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over whole sequences; see `chunk.chunk_gated_delta_rule` for shapes.

    backend: "auto" (Triton on CUDA tensors, else the reference), "triton" or "reference".
    """
    impl = chunk if resolve_backend(backend, q) == "triton" else reference
    return impl.chunk_gated_delta_rule(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size,
    )


def gated_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode token, `state` [B, H, K, V] fp32 updated in place; see `recurrent.gated_delta_step` for shapes.

    backend: "auto" (Triton on CUDA tensors, else the reference), "triton" or "reference".
    """
    impl = recurrent if resolve_backend(backend, q) == "triton" else reference
    return impl.gated_delta_step(q, k, v, g, beta, state, scale=scale)
