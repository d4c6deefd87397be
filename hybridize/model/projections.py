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
    save, and concatenating the weights at every decode step would copy them on each token (the static decoder
    keeps them concatenated once instead: FusedProjection). A layer wrapped by an
    adapter (peft's LoRA replaces nn.Linear with its own module) is called as it is, so the adapter keeps working.
    Fused outputs are views of one [..., N'] tensor (N' = N rounded up to a multiple of _ROW_ALIGN): contiguous
    in the last axis only.
    """
    if not torch.is_grad_enabled() or not fusable(groups):
        return tuple(torch.cat([layer(x) for layer in group], -1) if len(group) > 1 else group[0](x)
                     for group in groups)
    return split_groups(F.linear(x, *joined_weights(groups)), group_widths(groups))


# Every row of the joined output starts on a 128-byte boundary (64 bf16 values). An H100 profile of the SmolLM2
# window + memory decode step (joined width 2514) showed two costs of an unaligned width: cuBLAS ran its unaligned
# fallback (cutlass `..._align2`, 9.1 us against 3.9 us for the step's aligned GEMMs), and each view of that output
# was copied before the kernel that reads it (one copy kernel per view, every layer and token), as torch.compile's
# stride padding on a GPU (row strides above 1024 values rounded up to 128 bytes) would cause. Zero weight rows up
# to the boundary cost at most 63 rows of GEMM.
_ROW_ALIGN = 64


def group_widths(groups: Sequence[Sequence[nn.Module]]) -> list[int]:
    return [sum(layer.out_features for layer in group) for group in groups]


def joined_weights(groups: Sequence[Sequence[nn.Module]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layers' weights stacked [N, C] and their biases [N] (zeros for a layer without one; None if none has one),
    then zero rows up to the next multiple of _ROW_ALIGN, whose outputs split_groups drops."""
    layers = [layer for group in groups for layer in group]
    width = sum(layer.out_features for layer in layers)
    padding = -width % _ROW_ALIGN
    weights = [layer.weight for layer in layers]
    weight = torch.cat(weights + [weights[0].new_zeros(padding, weights[0].shape[1])])
    biases = [layer.bias for layer in layers]
    bias = None if all(b is None for b in biases) else torch.cat(
        [layer.weight.new_zeros(layer.out_features) if b is None else b for layer, b in zip(layers, biases)]
        + [weights[0].new_zeros(padding)])
    return weight, bias


def split_groups(y: torch.Tensor, widths: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """y [..., N'] from the joined weights -> one view per group, the alignment padding left out."""
    return y.split([*widths, y.shape[-1] - sum(widths)], dim=-1)[:-1]


def fusable(groups: Sequence[Sequence[nn.Module]]) -> bool:
    """Whether every layer of groups is a plain nn.Linear (an adapter-wrapped one must be called as it is)."""
    return all(type(layer) is nn.Linear for group in groups for layer in group)


class FusedProjection:
    """The plain nn.Linear layers of `groups` held as one weight [N', C] (and bias) for inference: calling it gives what
    project(x, groups) gives, in one GEMM also where project() would run one per layer. The weight is a copy, made
    once: refresh() re-reads the layers' weights into it in place, so a CUDA graph that reads it stays valid.
    """

    def __init__(self, groups: Sequence[Sequence[nn.Module]]):
        if not fusable(groups):
            raise ValueError("only plain nn.Linear layers can share one weight")
        self.groups = groups
        self.widths = group_widths(groups)
        with torch.no_grad():
            self.weight, self.bias = joined_weights(groups)  # [N', C], [N'] or None

    @torch.no_grad()
    def refresh(self) -> None:
        weight, bias = joined_weights(self.groups)
        self.weight.copy_(weight)
        if bias is not None:
            self.bias.copy_(bias)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [..., C] -> one [..., N_group] per group, views of one [..., N'] tensor (N' = N aligned)."""
        return split_groups(F.linear(x, self.weight, self.bias), self.widths)
