"""Which KV heads of each layer a head-wise layer should keep as attention: a per-KV-head score from one teacher pass.

score[layer][g] = ||W_o[:, g] o_g|| / ||W_o o|| over the held-out tokens: o_g is the attention output of KV head g's
query heads (before o_proj) and W_o[:, g] their o_proj columns, so the score is the relative error of the layer's
attention output when those heads output zero. That is a head-wise layer's step-0 error for the heads it converts
(conversion holds the new recurrent heads at zero), read for every KV head from one forward; the heads whose
removal costs most stay attention. The other heads become heads of the recurrent mixer the analysis chose for the
layer (headwise_plan).
"""

import torch

from ..errors import UserError
from ..model.configuration_hybrid import BRANCH_TYPES, HEADWISE_TYPES, RECURRENT_TYPES
from .select import RECURRENT_PREFERENCE

HEADWISE_OF = {memory: kind for kind, memory in HEADWISE_TYPES.items()}  # recurrent mixer -> its head-wise type


@torch.no_grad()
def kv_head_scores(teacher, input_ids: torch.LongTensor, layers: list[int]) -> dict[int, list[float]]:
    """{layer: [score of each KV head]} (see the module docstring) from teacher forwards over input_ids [N, T],
    one block at a time."""
    config = teacher.config
    kv_heads, dim = config.num_key_value_heads, config.head_dim
    group = config.num_attention_heads // kv_heads
    squares = {i: torch.zeros(kv_heads + 1, dtype=torch.float64) for i in layers}  # per KV head, then the whole

    def hook_for(index: int):
        def hook(module, args):
            heads = args[0].float().reshape(-1, kv_heads, group * dim)  # [N, G, group * D]: o per KV head's group
            weight = module.weight.float().view(module.out_features, kv_heads, group * dim)  # [C, G, group * D]
            parts = torch.einsum("ngd,cgd->gnc", heads, weight)  # [G, N, C]: each KV head's share of the output
            squares[index][:kv_heads] += parts.pow(2).sum((1, 2)).double().cpu()
            squares[index][kv_heads] += parts.sum(0).pow(2).sum().double().cpu()

        return hook

    handles = [teacher.model.layers[i].self_attn.o_proj.register_forward_pre_hook(hook_for(i)) for i in layers]
    try:
        for block in input_ids:
            teacher(input_ids=block[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {i: (s[:kv_heads] / s[kv_heads].clamp_min(1e-30)).sqrt().tolist() for i, s in squares.items()}


def check_heads(heads: int, num_kv_heads: int) -> None:
    if not 1 <= heads < num_kv_heads:
        raise UserError(f"--heads must keep at least one and fewer than all of the teacher's {num_kv_heads} KV heads "
                        f"(1..{num_kv_heads - 1}), got {heads}")


def choose_kv_heads(scores: dict[int, list[float]], heads: int) -> dict[str, list[int]]:
    """{layer: the `heads` highest-scoring KV heads, ascending} in the plan's headwise_kv_heads form."""
    return {str(i): sorted(sorted(range(len(row)), key=lambda g: -row[g])[:heads]) for i, row in scores.items()}


def recurrent_mixer(kind: str) -> str | None:
    """The recurrent mixer a layer type holds (its own or its memory branch's); None for attention."""
    return kind if kind in RECURRENT_TYPES else BRANCH_TYPES.get(kind)


def headwise_plan(plan: list[str], mixers: tuple[str, ...]) -> list[str]:
    """`plan` with every replaced layer made head-wise, its recurrent heads the mixer of the type chosen for it
    (mamba2 or window_mamba2: headwise_mamba2). A layer chosen as a sliding window gets the recurrent mixer that
    `mixers` allows (directly or as a memory), Gated DeltaNet first as in RECURRENT_PREFERENCE, and Gated DeltaNet
    when none is allowed."""
    allowed = {recurrent_mixer(m) for m in mixers}
    fallback = next((m for m in RECURRENT_PREFERENCE if m in RECURRENT_TYPES and m in allowed), "gated_deltanet")
    return [kind if kind == "full_attention" else HEADWISE_OF[recurrent_mixer(kind) or fallback] for kind in plan]
