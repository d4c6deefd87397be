"""Plan selection: the exact optimum under every constraint (checked against brute force), mixer rules, budgets."""

import itertools
import random

import pytest

from hybridize.analyze.select import (
    Constraints, assign_mixers, choose_plan, fast_choice, keep_attention, measured_choice, parse_budget,
)
from hybridize.errors import UserError


def brute_force(sensitivity, budget, constraints):
    """The best allowed subset by enumeration, or None when none exists."""
    allowed = [i for i in range(len(sensitivity)) if i >= constraints.no_attention_first]
    best = None
    for subset in itertools.combinations(allowed, budget):
        if any(b - a < constraints.min_spacing for a, b in zip(subset, subset[1:])):
            continue
        total = sum(sensitivity[i] for i in subset)
        if best is None or total > best[0] + 1e-12:
            best = (total, list(subset))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_keep_attention_is_the_constrained_optimum(seed):
    rng = random.Random(seed)
    num_layers = rng.randint(1, 9)
    constraints = Constraints(no_attention_first=rng.randint(0, 3), min_spacing=rng.randint(1, 3))
    budget = rng.randint(0, constraints.max_attention_layers(num_layers))
    sensitivity = [rng.uniform(-1, 1) for _ in range(num_layers)]
    expected = brute_force(sensitivity, budget, constraints)
    kept = keep_attention(sensitivity, budget, constraints)
    assert len(kept) == budget == len(set(kept))
    assert all(i >= constraints.no_attention_first for i in kept)
    assert all(b - a >= constraints.min_spacing for a, b in zip(kept, kept[1:]))
    assert sum(sensitivity[i] for i in kept) == pytest.approx(expected[0])


def test_max_attention_layers_is_attainable_and_tight():
    for num_layers, first, gap in itertools.product(range(1, 8), range(0, 4), range(1, 4)):
        constraints = Constraints(no_attention_first=first, min_spacing=gap)
        most = constraints.max_attention_layers(num_layers)
        assert brute_force([1.0] * num_layers, most, constraints) is not None
        assert brute_force([1.0] * num_layers, most + 1, constraints) is None


def test_unconstrained_selection_keeps_the_most_sensitive_layers():
    sensitivity = [0.1, 0.9, 0.3, 0.8, 0.05, 0.7]
    assert keep_attention(sensitivity, 3, Constraints()) == [1, 3, 5]
    assert keep_attention(sensitivity, 2, Constraints(min_spacing=3)) == [1, 5]
    assert keep_attention(sensitivity, 2, Constraints(no_attention_first=4)) == [4, 5]


def test_mixer_rules():
    kl = {"mamba2": [0.5, 0.1, 0.4], "gated_deltanet": [0.2, 0.3, 0.4], "sliding_attention": [0.9, 0.2, 0.6]}
    sensitivity, best = measured_choice(kl, ("mamba2", "gated_deltanet", "sliding_attention"))
    assert best == ["gated_deltanet", "mamba2", "mamba2"]  # ties go to the first allowed mixer
    assert sensitivity == [0.2, 0.1, 0.4]
    assert measured_choice(kl, ("sliding_attention",)) == ([0.9, 0.2, 0.6], ["sliding_attention"] * 3)
    assert fast_choice([0.01, 0.3], ("mamba2", "sliding_attention"), 0.05) == ["sliding_attention", "mamba2"]
    assert fast_choice([0.01, 0.3], ("mamba2", "gated_deltanet"), 0.05) == ["gated_deltanet"] * 2
    # a window + memory layer is preferred where the window alone loses too much
    assert fast_choice([0.01, 0.3], ("gated_deltanet", "sliding_attention", "window_mamba2"), 0.05) == [
        "sliding_attention", "window_mamba2"]
    best = ["mamba2"] * 6
    assert assign_mixers([2], best, Constraints()) == ["mamba2", "mamba2", "full_attention"] + ["mamba2"] * 3
    assert assign_mixers([2], best, Constraints(pattern="h2")) == [
        "mamba2", "gated_deltanet", "full_attention", "sliding_attention", "mamba2", "gated_deltanet"]
    assert assign_mixers([0], best[:4], Constraints(pattern="h2", mixers=("sliding_attention", "mamba2"))) == [
        "full_attention", "mamba2", "sliding_attention", "mamba2"]


def test_sinks_give_a_window_where_the_lost_mass_is_the_first_token():
    """Layer 1 loses 0.30 to a plain window, 0.28 of it on the first token: with sinks it gets a window. Layer 2
    loses 0.30 of distant content: a recurrent mixer either way. Layer 0 keeps attention (most sensitive)."""
    proxies = {"outside_window": [0.5, 0.30, 0.30], "first_token": [0.0, 0.28, 0.01],
               "entropy": [3.0, 1.0, 1.0], "distance": [3.0, 1.0, 1.0], "induction": [0.9, 0.0, 0.0]}
    constraints = Constraints(mixers=("gated_deltanet", "sliding_attention"))
    plain = choose_plan(1, constraints, proxies, None, "outside_window", 0.05)[2]
    sinks = choose_plan(1, constraints, proxies, None, "outside_window", 0.05, sink_tokens=4)[2]
    assert plain == ["full_attention", "gated_deltanet", "gated_deltanet"]
    assert sinks == ["full_attention", "sliding_attention", "gated_deltanet"]
    with pytest.raises(UserError, match="first-token mass"):
        choose_plan(1, constraints, {**proxies, "first_token": [None] * 3}, None, "outside_window", 0.05, 4)


def test_budget_parsing():
    assert parse_budget("4", 30) == 4
    assert parse_budget("0", 30) == 0
    assert parse_budget("0.25", 30) == 8  # 7.5 rounds up
    assert parse_budget("1.0", 30) == 30
    for text in ("31", "-1", "1.5", "abc", "0.2.1", "nan", "", "1e-1"):
        with pytest.raises(UserError, match="attention budget must be an integer in 0..30"):
            parse_budget(text, 30)


@pytest.mark.parametrize("kwargs, message", [
    ({"mixers": ("lstm",)}, "--mixers needs one or more distinct of mamba2, gated_deltanet, sliding_attention"),
    ({"mixers": ()}, "--mixers needs one or more distinct"),
    ({"mixers": ("mamba2", "mamba2")}, "--mixers needs one or more distinct"),
    ({"pattern": "h3"}, "unknown pattern 'h3'; allowed: best, h2"),
    ({"no_attention_first": -1}, "--no-attention-first must be >= 0"),
    ({"min_spacing": 0}, "--min-spacing must be >= 1"),
])
def test_bad_constraints(kwargs, message):
    with pytest.raises(UserError, match=message):
        Constraints(**kwargs)


def test_budget_that_cannot_fit_the_constraints():
    with pytest.raises(UserError, match="budget 3 does not fit: .* at most 2 of 6 layers can keep attention"):
        keep_attention([0.0] * 6, 3, Constraints(no_attention_first=2, min_spacing=3))
