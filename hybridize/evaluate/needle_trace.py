"""Needle trace: how far a passkey's number survives in each layer of a model, read chunk by chunk through its cache.

Two passkey prompts identical but for the hidden number are run side by side, a chunk at a time, through the
model's own cache (the path `generate()` prefills with). After each chunk, per layer, the number's footprint:
- in the residual stream: the relative difference between the two prompts' hidden states at the chunk's last token;
- in the recurrent state of a Mamba2 or Gated DeltaNet layer: the relative difference between the two states.
Before the needle both are exactly 0 (causality). A recurrent layer whose state footprint falls towards 0 between the
needle and the question has forgotten the number; the teacher's residual footprints show what its layers carry.
"""

import random

import torch

from ..model import HybridForCausalLM
from ..model.cache import HybridCache, RecurrentLayerCache
from .recall import Haystack, passkey_prompt

NUMBERS = ("1234567", "7654321")  # same digit count: the two prompts tokenize to the same length


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / (0.5 * (a.norm() + b.norm())).clamp_min(1e-30))


def _cache_for(model):
    # HF models (the teacher) build their own DynamicCache on the first call.
    return HybridCache(model.config) if isinstance(model, HybridForCausalLM) else None


@torch.no_grad()
def needle_trace(model, tokenizer, length: int = 1024, depth: float = 0.25, chunk: int = 128, seed: int = 0) -> dict:
    """{"needle": [start, end), "layer_types", "rows": one per chunk end with per-layer footprints}.

    rows[i]: {"tokens": tokens seen, "residual": [per layer], "state": [per layer, None where no recurrent state],
    "state_norm": [per layer, the first prompt's state norm, or None]}.
    """
    haystack = Haystack(tokenizer, length)
    prompts = [passkey_prompt(tokenizer, haystack, length, depth, random.Random(seed), number=n)[0] for n in NUMBERS]
    ids = torch.tensor(prompts, device=next(model.parameters()).device)  # [2, L]
    differs = (ids[0] != ids[1]).nonzero().flatten().tolist()
    cache = _cache_for(model)
    rows = []
    for start in range(0, length, chunk):
        out = model(input_ids=ids[:, start:start + chunk], past_key_values=cache, use_cache=True,
                    output_hidden_states=True)
        cache = out.past_key_values
        layers = out.hidden_states[1:]  # each [2, chunk, C]; the last is after the final norm
        row = {"tokens": min(start + chunk, length), "residual": [_relative_difference(h[0, -1], h[1, -1]) for h in layers],
               "state": [], "state_norm": []}
        for layer in cache.layers:
            state = layer.recurrent_state if isinstance(layer, RecurrentLayerCache) else None
            row["state"].append(None if state is None else _relative_difference(state[0], state[1]))
            row["state_norm"].append(None if state is None else float(state[0].norm()))
        rows.append(row)
    layer_types = list(getattr(model.config, "layer_types", None) or ["attention"] * len(rows[0]["residual"]))
    return {"length": length, "depth": depth, "needle": [differs[0], differs[-1] + 1],
            "layer_types": layer_types, "rows": rows}

