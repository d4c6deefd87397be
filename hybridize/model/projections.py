"""Several linear maps of one input computed as one matmul: the mixers' input projections."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def project(x: torch.Tensor, groups: Sequence[Sequence[nn.Module]]) -> tuple[torch.Tensor, ...]:
    """One output per group, the group's layers applied to x [..., C] and concatenated on the last axis.

    While gradients are recorded and every layer is a plain nn.Linear, the whole set is one matmul over the
    concatenated weights: a mixer's five or six projections then cost one GEMM forward and one input-gradient GEMM
    backward instead of one each plus a sum of their input gradients, which matters for small models whose layers
    are launch-bound. Without gradients (prefill, decoding) the layers run one by one: there is no gradient sum to
    save, and concatenating the weights at every decode step would copy them on each token. A layer wrapped by an
    adapter (peft's LoRA replaces nn.Linear with its own module) is called as it is, so the adapter keeps working.
    Fused outputs are views of one [..., N] tensor: contiguous in the last axis only.
    """
    layers = [layer for group in groups for layer in group]
    widths = [sum(layer.out_features for layer in group) for group in groups]
    if not torch.is_grad_enabled() or not all(type(layer) is nn.Linear for layer in layers):
        return tuple(torch.cat([layer(x) for layer in group], -1) if len(group) > 1 else group[0](x)
                     for group in groups)
    weight = torch.cat([layer.weight for layer in layers])  # [N, C]
    biases = [layer.bias for layer in layers]
    bias = None if all(b is None for b in biases) else torch.cat(
        [layer.weight.new_zeros(layer.out_features) if b is None else b for layer, b in zip(layers, biases)])
    return F.linear(x, weight, bias).split(widths, dim=-1)
