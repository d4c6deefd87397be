"""Attention-map proxies against loop-by-loop definitions on hand-made and random causal maps; rank statistics."""

import math

import pytest
import torch

from hybridize.analyze.proxies import (
    induction_statistic, map_statistics, proxy_sensitivity, ranks, repeated_random_tokens, spearman,
)


def random_causal_maps(batch: int, heads: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, length, length, generator=generator) * 3
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)  # [B, H, T, T]


def looped_statistics(probs: torch.Tensor, window: int) -> dict[str, list[float]]:
    """The definitions in docs/analyze.md, one query at a time, in float64."""
    batch, heads, length, _ = probs.shape
    result = {"entropy": [], "distance": [], "outside_window": []}
    for h in range(heads):
        entropy, distance, outside = [], [], []
        for b in range(batch):
            for i in range(length):
                row = [float(probs[b, h, i, j]) for j in range(i + 1)]
                distance.append(sum(p * (i - j) for j, p in enumerate(row)))
                if i >= 1:
                    entropy.append(-sum(p * math.log(p) for p in row if p > 0) / math.log(i + 1))
                if i >= window:
                    outside.append(sum(p for j, p in enumerate(row) if i - j >= window))
        for name, values in (("entropy", entropy), ("distance", distance), ("outside_window", outside)):
            result[name].append(sum(values) / len(values) if values else None)
    return result


def test_map_statistics_match_their_definitions_on_random_maps():
    probs = random_causal_maps(batch=2, heads=3, length=13, seed=0)
    got = map_statistics(probs, window=5)
    want = looped_statistics(probs, window=5)
    for name in ("entropy", "distance", "outside_window"):
        assert torch.allclose(got[name].double(), torch.tensor(want[name], dtype=torch.float64), atol=1e-5), name


def test_map_statistics_on_extreme_maps():
    length, window = 10, 4
    identity = torch.eye(length)[None, None]  # each query sees only itself
    uniform = torch.ones(length, length).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True))[None, None]
    first = torch.zeros(length, length)
    first[:, 0] = 1.0  # every query on token 0 (an attention sink)
    stats = map_statistics(torch.cat([identity, uniform, first[None, None]], dim=1), window)  # heads: 3 maps
    assert torch.allclose(stats["entropy"], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(stats["distance"], torch.tensor([0.0, (length - 1) / 4, (length - 1) / 2]), atol=1e-5)
    uniform_outside = sum((i - window + 1) / (i + 1) for i in range(window, length)) / (length - window)
    assert torch.allclose(stats["outside_window"], torch.tensor([0.0, uniform_outside, 1.0]), atol=1e-6)


def test_no_outside_window_statistic_when_blocks_fit_in_the_window():
    assert map_statistics(random_causal_maps(1, 2, 8, seed=1), window=8)["outside_window"] is None


def test_induction_statistic_reads_the_token_after_the_earlier_copy():
    period = 6
    length = 2 * period
    induction = torch.zeros(length, length)
    for i in range(length):
        induction[i, i - period + 1 if i >= period else i] = 1.0
    probs = torch.stack([induction, torch.eye(length)])[None]  # [1, 2, T, T]
    assert torch.allclose(induction_statistic(probs, period), torch.tensor([1.0, 0.0]))
    ids = repeated_random_tokens(vocab_size=50, seq_len=length + 1, count=3, seed=0)
    assert ids.shape == (3, length) and torch.equal(ids[:, :period], ids[:, period:])
    assert torch.equal(ids, repeated_random_tokens(50, length + 1, 3, seed=0))


def test_ranks_and_spearman():
    assert ranks([3.0, 1.0, 2.0, 1.0]) == [3.0, 0.5, 2.0, 0.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    # against the closed form 1 - 6 sum d^2 / (n (n^2 - 1)), valid without ties
    a, b = [0.3, 0.1, 0.9, 0.5, 0.7], [2.0, 1.0, 3.0, 5.0, 4.0]
    d2 = sum((x - y) ** 2 for x, y in zip(ranks(a), ranks(b)))
    assert spearman(a, b) == pytest.approx(1 - 6 * d2 / (5 * 24))


def test_proxy_sensitivity_orients_and_combines_ranks():
    proxies = {"entropy": [0.9, 0.1, 0.5], "distance": [1.0, 9.0, 5.0], "outside_window": [0.0, 0.4, 0.2],
               "induction": [0.0, 0.8, 0.3]}
    assert proxy_sensitivity(proxies, "entropy") == [-0.9, -0.1, -0.5]  # sharp attention counts as sensitive
    assert proxy_sensitivity(proxies, "combined") == [0.0, 1.0, 0.5]  # every proxy agrees on 1 > 2 > 0


def test_attention_proxies_reduce_the_teachers_own_attention_maps(tiny_teacher):
    from hybridize.analyze.proxies import attention_proxies

    blocks = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    probe = repeated_random_tokens(256, 16, count=1, seed=0)
    implementation = tiny_teacher.config._attn_implementation
    got = attention_proxies(tiny_teacher, blocks, probe, window=8)
    assert tiny_teacher.config._attn_implementation == implementation  # switched back after the eager pass
    tiny_teacher.set_attn_implementation("eager")
    with torch.no_grad():
        text_maps = [torch.cat(maps) for maps in zip(*(tiny_teacher(row[None], output_attentions=True).attentions
                                                       for row in blocks))]  # per layer [2, H, T, T]
        probe_maps = tiny_teacher(probe, output_attentions=True).attentions
    for i in range(4):
        want = map_statistics(text_maps[i], window=8)
        for name in ("entropy", "distance", "outside_window"):
            assert got[name][i] == pytest.approx(want[name].mean().item(), rel=1e-5), (name, i)
        assert got["induction"][i] == pytest.approx(induction_statistic(probe_maps[i], 8).max().item(), rel=1e-5)


def test_first_token_is_the_sink_part_of_the_outside_window_mass():
    length, window = 10, 4
    first = torch.zeros(length, length)
    first[:, 0] = 1.0  # every query on token 0: all of its outside-window mass is the sink
    uniform = torch.ones(length, length).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    previous = torch.eye(length).roll(-1, dims=1).tril()  # query i on key i - 1; query 0 has no key yet
    previous[0, 0] = 1.0
    stats = map_statistics(torch.stack([first, uniform, previous])[None], window)  # heads: 3 maps
    uniform_first = sum(1 / (i + 1) for i in range(window, length)) / (length - window)
    assert torch.allclose(stats["first_token"], torch.tensor([1.0, uniform_first, 0.0]), atol=1e-6)
    assert torch.all(stats["first_token"] <= stats["outside_window"] + 1e-6)
    assert map_statistics(torch.stack([first])[None], window=length)["first_token"] is None
