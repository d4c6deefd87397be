"""Quality numbers: exact agreement for a hybrid that is its teacher, real disagreement for a converted one."""

import math

import pytest
import torch

from hybridize.corpus import DOMAINS
from hybridize.evaluate.common import load_pair
from hybridize.evaluate.quality import (
    QualitySettings,
    compare,
    continuation_agreement,
    domain_quality,
    wilson_interval,
)

TINY = QualitySettings(seq_len=48, blocks_per_domain=2, batch_size=2, greedy_prompts=2, greedy_prompt_len=16)


def test_continuation_agreement_counts_exact_matches_and_prefixes():
    teacher = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    student = torch.tensor([[1, 2, 3, 4], [1, 2, 9, 4], [0, 6, 7, 8]])
    assert continuation_agreement(student, teacher) == (1, 4 + 2 + 0)


@pytest.mark.parametrize("successes, trials, expected", [
    (5, 10, (0.2366, 0.7634)),  # the textbook values of the 95% Wilson score interval
    (0, 10, (0.0, 0.2775)),
    (10, 10, (0.7225, 1.0)),
    (16, 48, (0.2167, 0.4746)),
])
def test_wilson_interval_matches_the_score_interval(successes, trials, expected):
    assert wilson_interval(successes, trials) == pytest.approx(expected, abs=1e-4)


def test_identity_hybrid_agrees_with_its_teacher_exactly(identity_dir):
    student, teacher, tokenizer, _ = load_pair(identity_dir, None, dtype=torch.float32, device=torch.device("cpu"))
    results, table = compare(student, teacher, tokenizer, settings=TINY)
    for domain in DOMAINS:
        r = results["domains"][domain]
        assert r["student_ppl"] == pytest.approx(r["teacher_ppl"], rel=1e-5)
        assert abs(r["kl"]) < 1e-6
        assert r["top1"] == 1.0
        assert r["greedy_exact"] == 1.0 and r["greedy_prefix"] == 32
    assert results["all"]["tokens"] == len(DOMAINS) * 2 * 47
    assert all(name in table for name in (*DOMAINS, "all", "KL(t||s)"))
    # 6 of 6 identical: the interval reaches 1, and its low end is 6 / (6 + z^2) at 6 trials.
    assert results["all"]["greedy_count"] == 6
    assert results["all"]["greedy_exact_interval"] == pytest.approx([6 / (6 + 1.959964**2), 1.0])
    assert "greedy32 exact over 6 continuations: 95% interval 0.610-1.000" in table


def test_converted_hybrid_differs_and_numbers_are_consistent(pair):
    student, teacher, tokenizer = pair
    results, _ = compare(student, teacher, tokenizer, settings=TINY)
    overall = results["all"]
    assert overall["kl"] > 1e-4
    assert 0 <= overall["top1"] < 1
    assert 0 <= overall["greedy_prefix"] <= 32
    # Pooled perplexity is the token-weighted geometric mean of the per-domain ones (equal token counts here).
    logs = [math.log(results["domains"][d]["student_ppl"]) for d in DOMAINS]
    assert overall["student_ppl"] == pytest.approx(math.exp(sum(logs) / len(logs)), rel=1e-6)


def test_without_teacher_reports_the_hybrid_alone(pair):
    student, _, tokenizer = pair
    results, table = compare(student, None, tokenizer, settings=TINY)
    assert set(results["all"]) == {"tokens", "student_ppl"}
    assert "code" in table and math.isfinite(results["all"]["student_ppl"])



def test_default_lengths_fit_the_smallest_held_out_domain(pair):
    """`hybridize eval` with no flags reads only what the packaged held-out docs have (about 17K tokens)."""
    student, teacher, tokenizer = pair
    settings = QualitySettings(batch_size=1, greedy_new_tokens=2)  # default block and prompt counts and lengths
    result = domain_quality(student, teacher, tokenizer, "docs", settings)
    assert result["tokens"] == settings.blocks_per_domain * (settings.seq_len - 1)
