"""Llama's SwiGLU MLP with its gate and up projections computed in one matmul (same parameter names as LlamaMLP)."""

import torch
from torch import nn
from transformers.activations import ACT2FN

from .projections import project


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): LlamaMLP's math and state-dict names, so teacher MLP weights load unchanged."""

    def __init__(self, config):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    @property
    def input_groups(self) -> list[tuple[nn.Linear, ...]]:
        return [(self.gate_proj,), (self.up_proj,)]

    def forward(self, x: torch.Tensor, projected=None) -> torch.Tensor:
        """x [..., C] -> [..., C]; projected: project(x, self.input_groups) when the caller computed it."""
        gate, up = projected if projected is not None else project(x, self.input_groups)  # [..., I] each
        return self.down_proj(self.act_fn(gate) * up)
