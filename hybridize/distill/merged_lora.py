"""LoRA on a frozen linear layer as one GEMM: the adapter folded into the weight for the forward and the input gradient.

peft's LoRA layer computes `y = x W^T + s (x A^T) B^T` as three GEMMs and a scaled add, so a layer of `dout`
outputs writes and reads back two more `[tokens, dout]` activations in the forward and again in the backward; at an
MLP's 8192 outputs that traffic costs about what the layer's GEMM does. Here the forward runs one GEMM with the
merged weight `W' = W + s B A` (formed per call: one `[dout, r] x [r, din]` product added to W), and the backward
uses the same `W'` for the input gradient:

    y  = x W'^T                         u = x A^T        (kept for dB, [tokens, r])
    dx = dy W'                          t = dy B         ([tokens, r])
    dB = s dy^T u                       dA = s t^T x

which is the same function and the same gradients as peft's (dx = dy W + s (dy B) A = dy W'), with W frozen, so
no `[dout, din]` weight gradient is formed. `W'` is rounded to the compute dtype once, where peft rounds the
adapter's output and the sum; both errors are of the size of one rounding of y.
"""

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear


def _merged_weight(weight, lora_a, lora_b, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """W + s B A in `dtype`: one addmm, which sums in fp32 (cuBLAS) and rounds the result once."""
    return torch.addmm(weight.to(dtype), lora_b.to(dtype), lora_a.to(dtype), alpha=scaling)  # [dout, din]


class MergedLoraFunction(torch.autograd.Function):
    """`x W^T + s (x A^T) B^T` for a frozen W (and frozen bias), with gradients to x, A and B. Every product runs in
    `dtype` (the autocast dtype, else x's); A's and B's gradients are returned in their own dtypes."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):  # every cast below is explicit
            x = x.to(dtype)
            u = F.linear(x, lora_a.to(dtype))  # [..., r]
            y = F.linear(x, _merged_weight(weight, lora_a, lora_b, scaling, dtype),
                         None if bias is None else bias.to(dtype))  # [..., dout]
        ctx.save_for_backward(x, u, weight, lora_a, lora_b)
        ctx.scaling, ctx.dtype = scaling, dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, weight, lora_a, lora_b = ctx.saved_tensors
        s, dtype = ctx.scaling, ctx.dtype
        dy = dy.to(dtype)
        dx = dy @ _merged_weight(weight, lora_a, lora_b, s, dtype) if ctx.needs_input_grad[0] else None  # [..., din]
        dy2, x2, u2 = dy.flatten(0, -2), x.flatten(0, -2), u.flatten(0, -2)  # [tokens, dout / din / r]
        d_b = (dy2.T @ u2).mul_(s)  # [dout, r]
        d_a = ((dy2 @ lora_b.to(dtype)).T @ x2).mul_(s)  # [r, din]
        return dx, None, None, d_a.to(lora_a.dtype), d_b.to(lora_b.dtype), None, None


class MergedLoraLinear(PeftLoraLinear):
    """peft's LoRA `Linear`, whose forward runs `MergedLoraFunction` in the plain case while gradients are recorded:
    one active vanilla adapter without dropout on a frozen layer, adapters neither merged nor disabled. Anything else
    is peft's own forward, and so is every forward without gradients (held-out evals, the on-policy stage's
    generation): forming W' reads and writes the weight, which costs more than the adapter's outputs when a call
    has few tokens. Merging, unloading and the state dict are peft's."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._plain_adapter() if torch.is_grad_enabled() else None
        if adapter is None or args or kwargs or x.dim() < 2:  # the backward flattens the token dims
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return MergedLoraFunction.apply(x, base.weight, base.bias, self.lora_A[adapter].weight,
                                        self.lora_B[adapter].weight, self.scaling[adapter], dtype)

    def _plain_adapter(self) -> str | None:
        """The one active adapter if this layer may run merged, else None."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        adapter = self.active_adapters[0]
        base = self.get_base_layer()
        frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
        plain = (adapter in self.lora_A and adapter not in self.lora_variant
                 and isinstance(self.lora_dropout[adapter], torch.nn.Identity))
        return adapter if frozen and plain else None
