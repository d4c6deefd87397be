"""Gated delta rule (Gated DeltaNet) op: chunked training/prefill form and decode step, Triton or PyTorch reference."""

import torch

from hybridize.kernels.backend import check_one_dtype, resolve_backend
from hybridize.kernels.gated_delta import chunk, layer_step, recurrent, reference
from hybridize.kernels.gated_delta.reference import GateParams, recurrent_gated_delta_rule

__all__ = ["GateParams", "chunk_gated_delta_rule", "gated_delta_layer_step", "gated_delta_step",
           "recurrent_gated_delta_rule"]


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
    gate_params: GateParams | None = None,
    qk_l2norm: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over whole sequences; see `chunk.chunk_gated_delta_rule` for shapes.

    gate_params: GateParams(A_log, dt_bias, b_bias), each [H]; g and beta are then the raw a and b, and the op forms
    g = -exp(A_log) softplus(a + dt_bias) and beta = sigmoid(b + b_bias) (fp32), with their gradients.
    qk_l2norm: q and k are raw; the op L2-normalizes them (1e-6 inside the rsqrt), with their gradients.
    backend: "auto" (Triton on CUDA tensors, else the reference), "triton" or "reference".
    """
    check_one_dtype(q, k, v)
    impl = chunk if resolve_backend(backend, q) == "triton" else reference
    return impl.chunk_gated_delta_rule(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size, gate_params=gate_params, qk_l2norm=qk_l2norm,
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
    gate_params: GateParams | None = None,
    qk_l2norm: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode token, `state` [B, H, K, V] fp32 updated in place; see `recurrent.gated_delta_step` for shapes.

    gate_params, qk_l2norm: the raw inputs, formed inside the kernel, as in `chunk_gated_delta_rule`.
    backend: "auto" (Triton on CUDA tensors, else the reference), "triton" or "reference".
    """
    impl = recurrent if resolve_backend(backend, q) == "triton" else reference
    return impl.gated_delta_step(q, k, v, g, beta, state, scale=scale, gate_params=gate_params, qk_l2norm=qk_l2norm)


def gated_delta_layer_step(
    qkv: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gate: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    state: torch.Tensor,
    gate_params: GateParams,
    norm_weight: torch.Tensor,
    *,
    k_heads: int,
    scale: float | None = None,
    norm_eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode token of a Gated DeltaNet layer between its projections: short conv + SiLU of qkv (conv_state
    updated in place), L2-normed q and k, the gate and beta from the raw a and b, the delta rule (state updated in
    place) and the gated RMSNorm of the output; see `layer_step.gated_delta_layer_step` for shapes.

    backend: "auto" (Triton on CUDA tensors, else the reference), "triton" or "reference".
    """
    impl = layer_step if resolve_backend(backend, qkv) == "triton" else reference
    return impl.gated_delta_layer_step(qkv, a, b, gate, conv_weight, conv_state, state, gate_params, norm_weight,
                                       k_heads=k_heads, scale=scale, norm_eps=norm_eps)
