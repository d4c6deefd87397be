"""Frozen linear weights held in bf16: the copy autocast would make at every call, made once.

The student trains with fp32 master weights under bf16 autocast. Autocast caches its casts only for weights that
require gradients, so each forward reads every frozen fp32 linear weight (the LoRA bases of kept attention layers
and MLPs, an untied output head, frozen mixers' projections) and writes a bf16 copy of it, which a plain linear
layer then keeps for its backward. Where every value of the weight is exactly representable in bf16 (a teacher
stored in bf16 and converted in bf16, then loaded in fp32 for training), holding the weight in bf16 changes no
result: autocast's cast of it was exact, so each layer computes with the same operands. It saves half the weight's
memory, the cast at every call, and the copies kept for the backward.

Weights shared with an embedding are left alone: the embedding's output starts the residual stream, which stays
fp32 (a bf16 embedding would make every residual addition bf16).
"""

import torch
from torch import nn

from .recipe import KDStage, Stage


def hold_frozen_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast each frozen `nn.Linear`'s weight and bias to `dtype` where that is exact (every value survives the
    round trip unchanged); returns the elements cast.

    Call after the trained parameters are chosen (requires_grad set) and before the model is compiled or wrapped.
    """
    embedded = {id(p) for module in model.modules() if isinstance(module, nn.Embedding) for p in module.parameters()}
    cast = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        params = list(module.parameters(recurse=False))
        if any(p.requires_grad or id(p) in embedded or p.dtype == dtype for p in params):
            continue
        low = [p.detach().to(dtype) for p in params]
        if all(torch.equal(q.to(p.dtype), p) for p, q in zip(params, low)):
            for p, q in zip(params, low):
                p.data = q
                cast += p.numel()
    return cast


def frozen_weight_dtype(stage: Stage, mixed_precision: str, sharded: bool) -> torch.dtype | None:
    """The dtype a stage holds its student's frozen linear weights in, or None to keep them fp32.

    kd stages under bf16 autocast (`mixed_precision: bf16`, on a GPU) on one process or under DDP. Not an on_policy
    stage, whose student also generates outside autocast in its own weights, and not under FSDP2, which shards and
    gathers the weights of a layer as one group.
    """
    if not isinstance(stage, KDStage) or sharded:
        return None
    return torch.bfloat16 if mixed_precision == "bf16" else None
