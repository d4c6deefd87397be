"""Needle trace: how far a passkey's number survives in each layer of a model, read chunk by chunk through its cache.

Two passkey prompts identical but for the hidden number are run side by side, a chunk at a time, through the
model's own cache (the path `generate()` prefills with). After each chunk, per layer, the number's footprint:
- in the residual stream: the relative difference between the two prompts' hidden states at the chunk's last token;
- in the recurrent state of a Mamba2 or Gated DeltaNet layer, or of the memory branch of a window + memory or
  head-wise layer: the relative difference between the two states.
Before the needle both are exactly 0 (causality). A recurrent layer whose state footprint falls towards 0 between the
needle and the question has forgotten the number; the teacher's residual footprints show what its layers carry.
Whether the attention that is kept looks at the number: per full-attention layer, the most attention any head puts
on the number's tokens from the prompt's last token, where the answer is read out. Why a recurrent layer forgets,
per layer: each head's half-life at a zero gate input (from its weights alone), and how much of what was written at
the needle's last token its decays alone keep by each chunk's end (the product of the head's a_t over the first
prompt's tokens since then; the delta rule's erasing and new writes are not counted).
"""

import math
import random
from contextlib import contextmanager

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..model import HybridForCausalLM
from ..model.cache import HybridCache, RecurrentLayerCache, WindowMemoryLayerCache
from ..model.gated_deltanet import GatedDeltaNetMixer
from ..model.mamba2 import Mamba2Mixer
from .recall import Haystack, passkey_prompt

NUMBERS = ("1234567", "7654321")  # same digit count: the two prompts tokenize to the same length


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / (0.5 * (a.norm() + b.norm())).clamp_min(1e-30))


def _cache_for(model):
    # HF models (the teacher) build their own DynamicCache on the first call.
    return HybridCache(model.config) if isinstance(model, HybridForCausalLM) else None


def _decaying_mixers(model) -> dict[int, torch.nn.Module]:
    """Layer index -> the module whose state decays: a Mamba2 / GDN mixer, or the recurrent branch of a two-branch
    layer; none in a teacher."""
    return {m.layer_idx: m for m in model.modules() if isinstance(m, (GatedDeltaNetMixer, Mamba2Mixer))}


def _half_lives(mixer: torch.nn.Module, zero_input: torch.Tensor) -> list[float]:
    """Each head's half-life in tokens at a zero gate input [1, 1, C]: ln 2 / -log a."""
    log_a = mixer.log_decay(zero_input)[0, 0]  # [H]
    return [math.log(2) / max(-value, 1e-30) for value in log_a.tolist()]


def _attention_modules(model) -> dict[int, torch.nn.Module]:
    """Layer index -> its full-attention module: every layer of a teacher, the full_attention layers of a hybrid."""
    if isinstance(model, HybridForCausalLM):
        return {i: layer.mixer for i, layer in enumerate(model.model.layers)
                if model.config.layer_types[i] == "full_attention"}
    return {i: layer.self_attn for i, layer in enumerate(model.model.layers)}


@contextmanager
def _recorded(modules: dict[int, torch.nn.Module], read):
    """{layer: read(module, its hidden_states input [2, chunk, C])} for the latest forward, while the block runs."""
    seen: dict[int, torch.Tensor] = {}

    def record(layer: int):
        def hook(module, args, kwargs):
            seen[layer] = read(module, args[0] if args else kwargs["hidden_states"])
        return hook

    hooks = [m.register_forward_pre_hook(record(layer), with_kwargs=True) for layer, m in modules.items()]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def _attention_on(model, attention: torch.nn.Module, hidden: torch.Tensor, keys: torch.Tensor,
                  span: tuple[int, int]) -> float:
    """The most attention any head puts on key positions [span) from the query of `hidden` [1, C], the last of the
    `keys` [1, Hkv, L, D] (after RoPE, as cached)."""
    length, head_dim = keys.shape[2], keys.shape[3]
    q = attention.q_proj(hidden).view(1, -1, 1, head_dim)  # [1, H, 1, D]
    cos, sin = model.model.rotary_emb(q, torch.tensor([[length - 1]], device=q.device))
    q = apply_rotary_pos_emb(q, q, cos, sin)[0]
    keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)  # [1, H, L, D]
    weights = torch.softmax((q.float() @ keys.float().transpose(-1, -2)) * head_dim**-0.5, dim=-1)  # [1, H, 1, L]
    return float(weights[0, :, 0, span[0]:span[1]].sum(-1).max())


@torch.no_grad()
def needle_trace(model, tokenizer, length: int = 1024, depth: float = 0.25, chunk: int = 128, seed: int = 0) -> dict:
    """{"needle": [start, end), "layer_types", "rows": one per chunk end with per-layer footprints}.

    rows[i]: {"tokens": tokens seen, "residual": [per layer], "state": [per layer, None where no recurrent state],
    "state_norm": [per layer, the first prompt's state norm, or None], "decay_kept": [per layer, log10 of the most
    any head's decays keep of the needle's last write, 0 before it; None where nothing decays]}.
    "half_life": [per layer, each head's half-life at a zero gate input, or None].
    "needle_attention": [per layer, the most attention a head puts on the number from the last token, or None].
    """
    haystack = Haystack(tokenizer, length)
    prompts = [passkey_prompt(tokenizer, haystack, length, depth, random.Random(seed), number=n)[0] for n in NUMBERS]
    ids = torch.tensor(prompts, device=next(model.parameters()).device)  # [2, L]
    differs = (ids[0] != ids[1]).nonzero().flatten().tolist()
    cache = _cache_for(model)
    mixers = _decaying_mixers(model)
    kept = {layer: 0.0 for layer in mixers}  # per layer: [H] sums of log a_t since the needle's last token
    rows = []
    attentions = _attention_modules(model)
    for start in range(0, length, chunk):
        with (_recorded(mixers, lambda mixer, hidden: mixer.log_decay(hidden[:1])) as log_decays,  # [1, chunk, H]
              _recorded(attentions, lambda attention, hidden: hidden) as attention_inputs):
            out = model(input_ids=ids[:, start:start + chunk], past_key_values=cache, use_cache=True,
                        output_hidden_states=True)
        cache = out.past_key_values
        since = max(0, differs[-1] + 1 - start)  # the chunk's first token after the needle
        for layer, log_a in log_decays.items():
            kept[layer] = kept[layer] + log_a[0, since:].sum(0)  # [H]
        layers = out.hidden_states[1:]  # each [2, chunk, C]; the last is after the final norm
        row = {"tokens": min(start + chunk, length), "residual": [_relative_difference(h[0, -1], h[1, -1]) for h in layers],
               "state": [], "state_norm": []}
        for layer in cache.layers:
            layer = layer.memory if isinstance(layer, WindowMemoryLayerCache) else layer
            state = layer.recurrent_state if isinstance(layer, RecurrentLayerCache) else None
            row["state"].append(None if state is None else _relative_difference(state[0], state[1]))
            row["state_norm"].append(None if state is None else float(state[0].norm()))
        row["decay_kept"] = [float(kept[i].max()) / math.log(10) if i in kept else None
                             for i in range(len(cache.layers))]
        rows.append(row)
    layer_types = list(getattr(model.config, "layer_types", None) or ["attention"] * len(rows[0]["residual"]))
    zero_input = torch.zeros(1, 1, model.config.hidden_size, device=ids.device, dtype=model.dtype)
    half_life = [_half_lives(mixers[i], zero_input) if i in mixers else None for i in range(len(layer_types))]
    number = (differs[0], differs[-1] + 1)
    needle_attention = [None] * len(layer_types)
    for i, attention in attentions.items():
        needle_attention[i] = _attention_on(model, attention, attention_inputs[i][:1, -1],
                                            cache.layers[i].keys[:1], number)
    return {"length": length, "depth": depth, "needle": list(number), "layer_types": layer_types, "rows": rows,
            "half_life": half_life, "needle_attention": needle_attention}

