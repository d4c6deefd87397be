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


def delayed_writes(writes: list[torch.Tensor], delay: int, layer_cache) -> list[torch.Tensor]:
    """The recurrence inputs [B, T, ...] each, moved `delay` tokens later: position t gets token t - delay's, and zeros
    before the first token. A zero k (raw or normalized) writes nothing, and the state before the first token is
    zero, so whatever decay a zero gate input gives (log decay 0, or a raw a = 0 with gdn_fused_inputs) keeps it zero.

    layer_cache.pending carries the last `delay` tokens' inputs from one forward to the next. Once it exists it is
    updated in place, so the static decoder's captured step keeps reading the same buffers.
    """
    length = writes[0].shape[1]
    pending = layer_cache.pending if layer_cache is not None else None
    if pending is None:
        pending = [w.new_zeros(w.shape[0], delay, *w.shape[2:]) for w in writes]
    streams = [torch.cat([p, w], 1) for p, w in zip(pending, writes)]  # [B, delay + T, ...] in token order
    if layer_cache is not None and layer_cache.pending is None:
        layer_cache.pending = [s[:, -delay:].clone() for s in streams]
    elif layer_cache is not None:
        for kept, stream in zip(layer_cache.pending, streams):
            kept.copy_(stream[:, -delay:])
    return [s[:, :length] for s in streams]


class OutsideWindowGatedDeltaNet(GatedDeltaNetMixer):
    """A Gated DeltaNet whose query at t reads a state of tokens up to t - sliding_window only: those that have left
    the window. Same parameters as GatedDeltaNetMixer."""

    plain_recurrence = False  # its decode step writes a delayed token: not the one-launch layer step

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.delay = config.sliding_window

    def new_pending(self, batch: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
        """Zeroed pending inputs k, v, g, beta for a static cache (the static decoder's)."""
        shapes = [((self.num_k_heads, self.head_k_dim), dtype), ((self.num_heads, self.head_v_dim), dtype),
                  ((self.num_heads,), torch.float32), ((self.num_heads,), torch.float32)]
        return [torch.zeros(batch, self.delay, *shape, dtype=t, device=device) for shape, t in shapes]

    def recurrence(self, q, k, v, g, beta, layer_cache, decoding: bool) -> torch.Tensor:
        k, v, g, beta = delayed_writes([k, v, g, beta], self.delay, layer_cache)
        return super().recurrence(q, k, v, g, beta, layer_cache, decoding)


class OutsideWindowMamba2(Mamba2Mixer):
    """A Mamba2 whose query at t reads a state of tokens up to t - sliding_window only (its D skip still reads the
    current token). Same parameters as Mamba2Mixer."""

    plain_recurrence = False  # its decode step writes a delayed token: not the one-launch layer step

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.delay = config.sliding_window

    def new_pending(self, batch: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
        """Zeroed pending inputs B, x * dt, g for a static cache (the static decoder's)."""
        shapes = [((self.num_groups, self.state_size), dtype), ((self.num_heads, self.head_dim), dtype),
                  ((self.num_heads,), torch.float32)]
        return [torch.zeros(batch, self.delay, *shape, dtype=t, device=device) for shape, t in shapes]

    def recurrence(self, c, b, v, g, layer_cache, decoding: bool) -> torch.Tensor:
        b, v, g = delayed_writes([b, v, g], self.delay, layer_cache)
        return super().recurrence(c, b, v, g, layer_cache, decoding)


MEMORY_MIXERS = {"gated_deltanet": GatedDeltaNetMixer, "mamba2": Mamba2Mixer}
OUTSIDE_WINDOW_MIXERS = {"gated_deltanet": OutsideWindowGatedDeltaNet, "mamba2": OutsideWindowMamba2}


class WindowMemoryMixer(nn.Module):
    """out = window(x) + memory_scale * memory(x).

    window: Attention with `config.sliding_window` (and its sinks), parameter names as in a sliding_attention layer
    under `window.`; memory: a GatedDeltaNetMixer or Mamba2Mixer under `memory.`, over every token so far, or with
    `config.memory_outside_window` over the tokens that have left the window only; memory_scale [C] scales each output
    channel of the memory branch. It sits after the memory's output projection (which mixes its heads), so the
    branch is used as it is. Conversion starts it at zero (the layer is then exactly its window); built from a config
    it starts at one, both branches open.
    """

    def __init__(self, config, layer_idx: int, memory_type: str):
        super().__init__()
        self.layer_idx = layer_idx
        self.window, self.memory = self.branches(config, layer_idx, memory_type)
        self.memory_scale = nn.Parameter(torch.empty(config.hidden_size))

    def branches(self, config, layer_idx: int, memory_type: str) -> tuple[Attention, nn.Module]:
        """(window, memory): the two branches this layer sums."""
        mixers = OUTSIDE_WINDOW_MIXERS if config.memory_outside_window else MEMORY_MIXERS
        window = Attention(config, layer_idx, window=config.sliding_window, sinks=config.sliding_window_sinks)
        return window, mixers[memory_type](config, layer_idx)

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
