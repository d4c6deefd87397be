"""Cheap proxies of how replaceable each teacher attention layer is, read from its attention maps.

Per layer (docs/analyze.md gives the reasoning):
- entropy:        H_i / log(i + 1), the attention entropy of query i normalized by its maximum over the i + 1 keys
                  it may see (0: one key, 1: uniform), averaged over queries i >= 1 and heads;
- distance:       sum_j p_ij (i - j), the mean attention distance in tokens, averaged over queries and heads;
- outside_window: sum_{j <= i - W} p_ij, the mass a sliding window of W tokens cannot see, averaged over queries
                  i >= W (the only ones that lose anything) and heads;
- induction:      on a random segment repeated twice, the mass each query of the repeat puts on the token after
                  its earlier copy, averaged over those queries; the max over heads (one induction head is enough).
Beside the proxies, not ranked: first_token, p_i0 averaged like outside_window, the part of that mass which is an
attention sink on the first token rather than distant content (a window that kept the first token would not lose it).
The maps come from the teacher run with eager attention, one block at a time, reduced inside a forward hook
so that no [B, H, T, T] map outlives its layer.
"""

from contextlib import contextmanager

import torch

PROXY_NAMES = ("entropy", "distance", "outside_window", "induction")
WINDOW_STATISTICS = ("first_token",)  # reported with the proxies, never ranked
# +1: a higher value suggests the layer needs full attention more; entropy counts the other way (diffuse
# attention is an average, which a recurrent state reproduces; sharp attention picks single tokens).
NEEDS_ATTENTION_SIGN = {"entropy": -1.0, "distance": 1.0, "outside_window": 1.0, "induction": 1.0}
FAST_RANKINGS = ("combined",) + PROXY_NAMES


def map_statistics(probs: torch.Tensor, window: int) -> dict[str, torch.Tensor | None]:
    """Per-head means [H] of entropy, distance, outside_window and first_token for causal maps probs [B, H, T, T].

    outside_window and first_token are None when T <= window (no query has a key outside its window).
    """
    probs = probs.float()
    length = probs.shape[-1]
    positions = torch.arange(length, device=probs.device, dtype=torch.float32)
    entropy = torch.special.entr(probs).sum(-1)[..., 1:] / torch.log(positions[1:] + 1)  # [B, H, T-1]
    # Rows sum to 1, so sum_j p_ij (i - j) = i - sum_j p_ij j: a matrix-vector product, not a [T, T] product.
    distance = positions - probs @ positions  # [B, H, T]
    stats = {"entropy": entropy.mean((0, 2)), "distance": distance.mean((0, 2)), "outside_window": None,
             "first_token": None}
    if length > window:
        far = (positions[window:, None] - positions[None, :]) >= window  # [T-W, T]
        outside = (probs[..., window:, :] * far).sum(-1)  # [B, H, T-W]
        stats["outside_window"] = outside.mean((0, 2))
        stats["first_token"] = probs[..., window:, 0].mean((0, 2))  # token 0 is outside every query i >= W
    return stats


def induction_statistic(probs: torch.Tensor, period: int) -> torch.Tensor:
    """Per-head mean [H] of the mass query i (i >= period) puts on key i - period + 1, for maps [B, H, 2P, 2P]."""
    queries = torch.arange(period, probs.shape[-1], device=probs.device)
    return probs[..., queries, queries - period + 1].float().mean((0, 2))


def repeated_random_tokens(vocab_size: int, seq_len: int, count: int, seed: int) -> torch.LongTensor:
    """[count, 2P] ids (P = seq_len // 2): a random segment followed by the same segment again."""
    generator = torch.Generator().manual_seed(seed)
    segment = torch.randint(vocab_size, (count, seq_len // 2), generator=generator)
    return torch.cat([segment, segment], dim=1)


@contextmanager
def eager_attention(teacher):
    """The teacher with eager attention, the implementation that materializes the probabilities; restored after."""
    previous = teacher.config._attn_implementation
    teacher.set_attn_implementation("eager")
    try:
        yield teacher
    finally:
        teacher.set_attn_implementation(previous)


@contextmanager
def attention_map_hooks(teacher, reduce):
    """Calls reduce(layer, probs [B, H, T, T]) for every attention layer of every forward inside the block."""

    def hook_for(index: int):
        def hook(module, args, output):
            reduce(index, output[1])

        return hook

    handles = [layer.self_attn.register_forward_hook(hook_for(i)) for i, layer in enumerate(teacher.model.layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def attention_proxies(
    teacher, blocks: torch.LongTensor, induction_ids: torch.LongTensor, window: int, progress=None
) -> dict[str, list[float]]:
    """{proxy or window statistic: one value per layer} from text blocks [N, T] and repeated-token blocks [M, 2P]."""
    # per_head[name][layer]: one [H] tensor per forward
    per_head: dict[str, list[list[torch.Tensor]]] = {
        name: [[] for _ in range(teacher.config.num_hidden_layers)] for name in PROXY_NAMES + WINDOW_STATISTICS
    }

    def reduce_text(index, probs):
        for name, value in map_statistics(probs, window).items():
            if value is not None:
                per_head[name][index].append(value.cpu())

    def reduce_induction(index, probs):
        per_head["induction"][index].append(induction_statistic(probs, induction_ids.shape[1] // 2).cpu())

    with eager_attention(teacher):
        for rows, reduce in ((blocks, reduce_text), (induction_ids, reduce_induction)):
            with attention_map_hooks(teacher, reduce):
                for row in rows:  # one block per forward: the maps of a whole batch need not fit at once
                    teacher.model(input_ids=row[None], use_cache=False)  # the maps are all we need: no logits
                    if progress is not None:
                        progress.update(1)
    result = {}
    for name, layers in per_head.items():
        heads = [torch.stack(values).mean(0) if values else torch.zeros(1) for values in layers]  # [H] per layer
        result[name] = [float(h.max() if name == "induction" else h.mean()) for h in heads]
    return result


def ranks(values: list[float]) -> list[float]:
    """0-based ranks, ties sharing their mean rank (the ranks Spearman's correlation uses)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            result[order[k]] = (start + end) / 2
        start = end + 1
    return result


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation of two equally long lists; None when either is constant (it is undefined)."""
    ra, rb = torch.tensor(ranks(a)), torch.tensor(ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return None if denominator == 0 else float((ra @ rb).item() / denominator)


def proxy_sensitivity(proxies: dict[str, list[float]], ranking: str) -> list[float]:
    """Fast-mode sensitivity per layer: one proxy oriented by NEEDS_ATTENTION_SIGN, or ("combined") the mean of
    every proxy's rank scaled to [0, 1], so no proxy's units dominate."""
    if ranking != "combined":
        return [NEEDS_ATTENTION_SIGN[ranking] * v for v in proxies[ranking]]
    num_layers = len(proxies[PROXY_NAMES[0]])
    scale = max(num_layers - 1, 1)
    oriented = [ranks([NEEDS_ATTENTION_SIGN[n] * v for v in proxies[n]]) for n in PROXY_NAMES]
    return [sum(r[i] for r in oriented) / (len(PROXY_NAMES) * scale) for i in range(num_layers)]


def distant_content(outside_window: float | None, first_token: float | None) -> float | None:
    """The part of a layer's outside-window mass that is not on the first token (what a window with sinks still
    loses); None when either was not measured."""
    return None if outside_window is None or first_token is None else max(outside_window - first_token, 0.0)
