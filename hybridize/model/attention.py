"""Llama attention (full or sliding-window) with RoPE: flash-attn when installed; otherwise PyTorch SDPA, and
compiled flex attention for sliding windows on CUDA when the keys are the queries (training, a first prefill).

A sliding window may also keep "sinks": every query sees, besides its window, the first `sinks` real tokens of its
row. In the converted SmolLM2 most of what a window drops is attention on the first token (docs/results.md)."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .cache import SinkWindowLayer
from .compiling import allow_recompiles
from .context import SequenceContext, real_token_rank
from .projections import project

try:
    from flash_attn import flash_attn_func
except ImportError:  # flash-attn is optional; SDPA serves every case it would
    flash_attn_func = None


def visible(distance: torch.Tensor, window: int | None) -> torch.Tensor:
    """Whether a key `distance` slots before its query (query - key slot) is attended: causal, within the window."""
    allowed = distance >= 0
    return allowed if window is None else allowed & (distance < window)


def attention_mask_for(
    query_slots: torch.Tensor, key_slots: torch.Tensor, window: int | None, key_valid: torch.Tensor | None,
    sinks: int = 0, key_rank: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask [B or 1, 1, Tq, Tk]: causal, within the window or among the first `sinks` real tokens (key_rank
    [B, Tk] is a key's index among its row's real tokens; None means no padding, so the rank is the slot), keys
    not padding.

    Slots are indices in the (left-padded) token stream; with left padding, slot distance equals token
    distance between real tokens. A query may always see itself, so padded queries never get an
    all-masked row (their outputs are ignored).
    """
    distance = query_slots[:, None] - key_slots[None, :]  # [Tq, Tk]
    allowed = visible(distance, window)[None, None]  # [1, 1, Tq, Tk]
    if sinks and window is not None:
        rank = key_slots[None] if key_rank is None else key_rank  # [B or 1, Tk]
        allowed = allowed | ((rank < sinks)[:, None, None, :] & (distance >= 0)[None, None])
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :].bool()
    return allowed | (distance == 0)[None, None]


# Plain module state, no functools: the Hub export's remote code may import only torch, transformers and a few
# standard modules (tests/publish). Both are filled on first use, so importing the model compiles nothing.
_compiled_flex_attention = None
# BlockMasks by (length, window, sinks, device), shared by every layer and step. Each holds int32 tile tables of
# O((T/128)^2) entries (64 KiB at T = 8K, 16 MiB at 128K); building one evaluates the mask densely once ([T, T],
# which the SDPA path does in every layer). Past 16 keys the oldest is dropped, so an evaluation's many lengths
# cannot pile up.
_block_masks: dict[tuple[int, int, int, torch.device], BlockMask] = {}
_MAX_BLOCK_MASKS = 16


def _flex_attention():
    """flex_attention compiled once. Eager it computes every score densely; compiled it is one fused kernel that
    skips the tiles outside the block mask. Shapes are static: each new sequence length compiles once more (a few
    seconds; past dynamo's recompile limit, raised to 64 by allow_recompiles, the dense eager path). torch.compile's
    default would recompile a second length with a dynamic one, and Inductor (torch 2.11, Triton 3.6, H100) cannot
    lower flex_attention at a dynamic length: NoValidChoicesError at head dims 16 and 64, fp32 and bf16."""
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        allow_recompiles()
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


@torch.compiler.disable  # inside a compiled layer: a cache lookup for the graph to take as an input, not to trace
def _window_block_mask(length: int, window: int, sinks: int, device: torch.device) -> BlockMask:
    key = (length, window, sinks, device)
    if key not in _block_masks:
        if len(_block_masks) == _MAX_BLOCK_MASKS:
            del _block_masks[next(iter(_block_masks))]  # dicts keep insertion order: the oldest

        def mask_mod(batch, head, query, kv):
            return visible(query - kv, window) | ((kv < sinks) & (kv <= query))  # no padding: rank = slot

        _block_masks[key] = create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)
    return _block_masks[key]


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             sinks: int = 0) -> torch.Tensor:
    """Causal attention within `window` tokens or to the first `sinks`, key i being query i's token (no cache, no
    padding): q [B, H, T, D], k and v [B, Hkv, T, D] -> [B, H, T, D]."""
    device = q.device.type
    if torch.is_autocast_enabled(device):
        # Autocast casts SDPA's inputs but not flex attention's, and RoPE's fp32 tables leave q and k in fp32
        # while v is in the autocast dtype: cast all three as autocast would for SDPA.
        dtype = torch.get_autocast_dtype(device)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    block_mask = _window_block_mask(q.shape[2], window, sinks, q.device)
    return _flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=True)  # [B, H, T, D]


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads; `window` set makes it sliding-window attention, and `sinks` lets
    such a window also see the first `sinks` real tokens. `kv_heads` (default: the config's) sets how many KV heads
    it has, each with the config's number of query heads per KV head: a head-wise layer's attention part."""

    def __init__(self, config, layer_idx: int, window: int | None, sinks: int = 0, kv_heads: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = window
        self.sinks = sinks if window is not None else 0
        group = config.num_attention_heads // config.num_key_value_heads
        self.num_kv_heads = kv_heads or config.num_key_value_heads
        self.num_heads = self.num_kv_heads * group
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    @property
    def input_groups(self) -> list[tuple[nn.Linear, ...]]:
        """The projections of the layer input, grouped as project() takes them."""
        return [(self.q_proj,), (self.k_proj,), (self.v_proj,)]

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, C] -> q [B, H, T, D], k and v [B, Hkv, T, D], before RoPE."""
        batch, length, _ = hidden_states.shape
        q, k, v = project(hidden_states, self.input_groups)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, hidden_states: torch.Tensor, context: SequenceContext, layer_cache=None) -> torch.Tensor:
        """hidden_states [B, T, C] -> [B, T, C]; layer_cache is a transformers DynamicLayer /
        DynamicSlidingWindowLayer, or our SinkWindowLayer."""
        batch, length, _ = hidden_states.shape
        q, k, v = self.project_qkv(hidden_states)
        cos, sin = context.position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # [B, H, T, D], [B, Hkv, T, D]
        key_slots = None  # the keys' stream indices, when they are not the last Tk
        if isinstance(layer_cache, SinkWindowLayer):
            k, v, key_slots = layer_cache.update_with_slots(k, v, context.attention_mask)  # [B, Hkv, Tk, D], [Tk]
        elif layer_cache is not None:
            k, v = layer_cache.update(k, v)  # [B, Hkv, Tk, D]: cached keys (window-trimmed) then the new ones
        out = self._attend(q, k, v, context.attention_mask, context.past_tokens, key_slots)  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def _attend(self, q, k, v, attention_mask, past_tokens, key_slots=None):
        length, key_length = q.shape[2], k.shape[2]
        total = past_tokens + length
        padded = attention_mask is not None
        windowed = self.window is not None and total > self.window
        sink_mask = windowed and self.sinks > 0  # a mask flash-attn cannot express
        if (flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not padded
                and not sink_mask):
            # flash-attn aligns the causal diagonal bottom-right, which is what a cache continuation needs.
            window = (self.window - 1, 0) if self.window is not None else (-1, -1)
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                  window_size=window)
            return out.transpose(1, 2)
        gqa = self.num_heads != self.num_kv_heads
        if not padded and not windowed and length == key_length:
            return F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, enable_gqa=gqa)
        if not padded and not windowed and length == 1:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        if q.is_cuda and not padded and past_tokens == 0 and length == key_length:
            # Windowed: SDPA with a [T, T] mask would compute the whole causal square; flex skips the tiles
            # outside the window. Only on CUDA, where flex attention also has a backward.
            return sliding_window_attention(q, k, v, self.window, self.sinks)
        if key_slots is None:
            key_slots = torch.arange(total - key_length, total, device=q.device)
        query_slots = torch.arange(past_tokens, total, device=q.device)
        key_valid = attention_mask[:, key_slots] if padded else None  # [B, Tk]
        key_rank = real_token_rank(attention_mask)[:, key_slots] if padded and sink_mask else None  # [B, Tk]
        mask = attention_mask_for(query_slots, key_slots, self.window, key_valid, self.sinks, key_rank)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
