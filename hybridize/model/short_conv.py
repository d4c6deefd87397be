"""The short causal conv + SiLU that Mamba2 and GDN run before their recurrence, with the cache and padding handled once."""

import torch

from . import ops
from .context import SequenceContext


def padding_keep(hidden_states: torch.Tensor, context: SequenceContext) -> torch.Tensor | None:
    """[B, T, 1] with 0 at left-padding positions of this forward, or None when nothing is padded."""
    mask = context.new_tokens_mask
    return None if mask is None else mask[:, :, None].to(hidden_states.dtype)


def is_decoding(layer_cache, length: int) -> bool:
    """One new token on top of a filled state: the single-step kernels apply."""
    return layer_cache is not None and layer_cache.has_state and length == 1


def cached_short_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer_cache, keep: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(silu(conv(x)) [B, T, D], the new conv window for the cache or None).

    Decoding updates the cached window in place; otherwise the window continues from the cache (chunked
    prefill) and the new one is returned for the caller to store with its recurrent state. Outputs at
    padded positions are zeroed, so a padded token never writes into the recurrent state.
    """
    conv_state = None
    if is_decoding(layer_cache, x.shape[1]):
        y = ops.causal_conv1d_step(x[:, 0], weight, bias, conv_state=layer_cache.conv_state, activation="silu")[:, None]
    else:
        y, conv_state = ops.causal_conv1d(
            x, weight, bias, activation="silu",
            initial_state=layer_cache.conv_state if layer_cache is not None else None,
            output_final_state=layer_cache is not None,
        )
    return (y if keep is None else y * keep), conv_state
