"""torch.compile for our models: each decoder layer compiled on its own, and dynamo's recompile limit raised.

A layer's norms, projections, MLP, residual adds and the elementwise glue around our kernels (L2 norms, gates,
casts) fuse into a few Triton kernels per graph, forward and backward. The chunked kernels themselves stay
opaque (hybridize.model.ops), so a replaced layer compiles as a few graphs between them.
"""

import torch
from torch import nn


def allow_recompiles(limit: int = 64) -> None:
    """Each shape, layer kind and grad mode is its own compile; past dynamo's default limit of 8 it would silently
    run eager."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> None:
    """Compile every decoder layer of a causal LM (`model.model.layers`, ours or a Llama) in place, once.

    Compiling per layer rather than the whole model keeps each graph small, leaves gradient checkpointing
    wrapping plain layers, and lets identical layers share one graph: dynamo reads their parameters as inputs.
    `backend` is torch.compile's ("aot_eager" traces the same graphs without generating code, for tests).
    """
    allow_recompiles()
    for layer in model.model.layers:
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile(backend=backend)
