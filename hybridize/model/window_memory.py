"""Intra-layer hybrids: sliding-window softmax attention over the last W tokens plus a recurrent memory (Gated DeltaNet
or Mamba2) over the whole sequence, summed in one token mixer.

The window keeps attention's exact local behaviour; the memory keeps a fixed-size summary of everything, so a model
of such layers only caches W keys and one state per layer, whatever the context length.
"""

import torch
from torch import nn

from .attention import Attention
from .cache import WindowMemoryLayerCache
from .context import SequenceContext
from .gated_deltanet import GatedDeltaNetMixer
from .mamba2 import Mamba2Mixer

MEMORY_MIXERS = {"gated_deltanet": GatedDeltaNetMixer, "mamba2": Mamba2Mixer}


class WindowMemoryMixer(nn.Module):
    """out = window(x) + memory_scale * memory(x).

    window: Attention with `config.sliding_window` (and its sinks), parameter names as in a sliding_attention layer
    under `window.`; memory: a GatedDeltaNetMixer or Mamba2Mixer under `memory.`; memory_scale [C] scales each output
    channel of the memory branch. It sits after the memory's output projection (which mixes its heads), so the
    branch is used as it is. Conversion starts it at zero (the layer is then exactly its window); built from a config
    it starts at one, both branches open.
    """

    def __init__(self, config, layer_idx: int, memory_type: str):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = Attention(config, layer_idx, window=config.sliding_window, sinks=config.sliding_window_sinks)
        self.memory = MEMORY_MIXERS[memory_type](config, layer_idx)
        self.memory_scale = nn.Parameter(torch.empty(config.hidden_size))

    @torch.no_grad()
    def new_parameter_values(self) -> dict[str, torch.Tensor]:
        return {"memory_scale": torch.ones_like(self.memory_scale)}

    def combine(self, window_out: torch.Tensor, memory_out: torch.Tensor) -> torch.Tensor:
        """The layer output from the two branches' outputs [B, T, C] (also what the static decoder calls)."""
        return window_out + self.memory_scale.to(memory_out.dtype) * memory_out

    def forward(self, hidden_states: torch.Tensor, context: SequenceContext,
                layer_cache: WindowMemoryLayerCache | None = None) -> torch.Tensor:
        """hidden_states [B, T, C] -> [B, T, C]."""
        window_cache = layer_cache.window if layer_cache is not None else None
        memory_cache = layer_cache.memory if layer_cache is not None else None
        return self.combine(self.window(hidden_states, context, window_cache),
                            self.memory(hidden_states, context, memory_cache))
