"""HybridCache: KV caches for attention layers, conv + recurrent states for Mamba2 / GDN layers, and both for
window + memory and head-wise layers, for `generate()`."""

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from .configuration_hybrid import HEADWISE_TYPES, WINDOW_MEMORY_TYPES


class RecurrentLayerCache:
    """The state one Mamba2 or GDN layer carries between forwards: a short-conv window and a recurrent state.

    conv_state: [B, D_conv, W-1] (the last W-1 conv inputs), recurrent_state: [B, H, K, V] in fp32.
    Both are set by the first (prefill) forward, then updated in place by single-token decode steps.
    pending: only for a memory that reads what has left a window (model/window_memory.py): the recurrence inputs of
    the last `window` tokens, [B, window, ...] each, not yet written into the state.
    """

    is_compileable = False
    supports_early_init = False
    is_sliding = False
    is_croppable = False

    def __init__(self):
        self.conv_state: torch.Tensor | None = None
        self.recurrent_state: torch.Tensor | None = None
        self.pending: list[torch.Tensor] | None = None

    @property
    def has_state(self) -> bool:
        return self.recurrent_state is not None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.conv_state, self.recurrent_state, *(self.pending or [])) if t is not None]

    def _apply(self, fn) -> None:
        if self.has_state:
            self.conv_state, self.recurrent_state = fn(self.conv_state), fn(self.recurrent_state)
        if self.pending is not None:
            self.pending = [fn(t) for t in self.pending]

    def reset(self) -> None:
        self.conv_state = self.recurrent_state = self.pending = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent state cannot be rolled back; assisted decoding is not supported")

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        """Offloading is not used for recurrent states: they are small and fixed-size."""


class SinkWindowLayer(DynamicLayer):
    """generate()'s cache for a sliding window with sinks: the window's last `sliding_window - 1` keys plus every
    row's first `sinks` real tokens.

    keys, values [B, Hkv, n, D] hold the stream indices in `slots` [n] (ascending, shared by all rows): a leading
    run of slots up to where the most-padded row's sinks end, then the window. Prompts are left-padded, so the
    leading run is at most `sinks` + the longest padding.
    """

    is_sliding = True

    def __init__(self, sliding_window: int, sinks: int):
        super().__init__()
        self.sliding_window, self.sinks = sliding_window, sinks
        self.cumulative_length = 0
        self.slots: torch.Tensor | None = None

    def update_with_slots(self, key_states: torch.Tensor, value_states: torch.Tensor,
                          attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append the new K/V [B, Hkv, T, D]; return every kept key before trimming, with its slots [Tk].

        attention_mask [B, past + T] (0 at left padding) or None when nothing is padded.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.slots = torch.zeros(0, dtype=torch.long, device=key_states.device)
        start = self.cumulative_length
        self.cumulative_length += key_states.shape[-2]
        total = self.cumulative_length
        slots = torch.cat([self.slots, torch.arange(start, total, device=self.slots.device)])
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        keep = (slots > total - self.sliding_window) | (slots < self._sink_run(attention_mask, total))
        self.keys, self.values, self.slots = keys[:, :, keep], values[:, :, keep], slots[keep]
        return keys, values, slots

    def _sink_run(self, attention_mask: torch.Tensor | None, total: int) -> int:
        """Length of the leading run of slots that holds every row's first `sinks` real tokens (all of a row's
        tokens while it has fewer). It only grows, so a slot dropped once is never needed again."""
        if attention_mask is None:
            return min(self.sinks, total)
        before = (attention_mask.long().cumsum(-1) < self.sinks).sum(-1)  # [B] slots before the sinks-th real token
        return int(torch.clamp(before + 1, max=total).max())

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a sink window's dropped keys cannot be restored; assisted decoding is not supported")


class WindowMemoryLayerCache:
    """A window + memory layer's cache: its window's keys (`window`, as a sliding_attention layer keeps them) and its
    memory branch's conv window and state (`memory`). Both are bounded, so the layer's cache does not grow with the
    sequence. A head-wise layer's cache is the same pair: its attention heads' keys (a DynamicLayer when they see
    the whole sequence, which then grows) and its recurrent heads' state."""

    is_compileable = False
    supports_early_init = False
    is_croppable = False

    def __init__(self, window, memory: RecurrentLayerCache):
        self.window, self.memory = window, memory
        self.is_sliding = window.is_sliding

    def tensors(self) -> list[torch.Tensor]:
        keys = [t for t in (self.window.keys, self.window.values) if t is not None] if self.window.is_initialized else []
        return keys + self.memory.tensors()

    def get_seq_length(self) -> int:
        return self.window.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.window.reset()
        self.memory.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.window.reorder_cache(beam_idx)
        self.memory.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.window.batch_repeat_interleave(repeats)
        self.memory.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.window.batch_select_indices(indices)
        self.memory.batch_select_indices(indices)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a memory state cannot be rolled back; assisted decoding is not supported")

    def offload(self) -> None:
        self.window.offload()
        self.memory.offload()

    def prefetch(self) -> None:
        self.window.prefetch()


def _window_cache(config):
    if config.sliding_window_sinks:
        return SinkWindowLayer(config.sliding_window, config.sliding_window_sinks)
    return DynamicSlidingWindowLayer(sliding_window=config.sliding_window)


def _layer_cache(config, kind: str):
    if kind == "full_attention":
        return DynamicLayer()
    if kind == "sliding_attention":
        return _window_cache(config)
    if kind in WINDOW_MEMORY_TYPES:
        return WindowMemoryLayerCache(_window_cache(config), RecurrentLayerCache())
    if kind in HEADWISE_TYPES:
        attention = _window_cache(config) if config.headwise_window else DynamicLayer()
        return WindowMemoryLayerCache(attention, RecurrentLayerCache())
    return RecurrentLayerCache()


class HybridCache(Cache):
    """One layer cache per decoder layer, chosen by `config.layer_types`.

    The number of tokens seen is tracked here rather than read off an attention layer, so that a
    model with no attention layer at all still knows its position.
    """

    def __init__(self, config):
        super().__init__(layers=[_layer_cache(config, kind) for kind in config.layer_types])
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def is_compileable(self) -> bool:
        # generate() would otherwise build 4D masks from our config with HF's mask helpers; we build our own.
        return False

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("HybridCache cannot be cropped: recurrent states cannot be rolled back")

    def nbytes(self) -> int:
        """Bytes held by every cached tensor (KV, conv windows, recurrent states)."""
        total = 0
        for layer in self.layers:
            tensors = (layer.tensors() if isinstance(layer, (RecurrentLayerCache, WindowMemoryLayerCache))
                       else [layer.keys, layer.values])
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total
