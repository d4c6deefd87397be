"""Passkey prompts and MQAR sequences are built as described, and the suite scores both models."""

import random

import pytest

from hybridize.evaluate.recall import (NEEDLE, QUESTION, Haystack, RecallSettings, mqar_sample, passkey_found,
                                       passkey_prompt, recall_table, run_recall, single_token_words)


@pytest.fixture(scope="module")
def haystack(tokenizer):
    return Haystack(tokenizer, 1024)


@pytest.mark.parametrize("length", [200, 333, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_has_exact_length_and_needle_at_depth(tokenizer, haystack, length, depth):
    ids, number = passkey_prompt(tokenizer, haystack, length, depth, random.Random(7))
    assert len(ids) == length and len(number) == 7
    text = tokenizer.decode(ids)
    name = text.rsplit("secret number of ", 1)[1].removesuffix(" is")
    assert text.endswith(QUESTION.format(name=name))
    needle = NEEDLE.format(name=name, number=number)
    assert text.count(needle) == 1
    where = text.index(needle) / (len(text) - len(QUESTION.format(name=name)))
    assert abs(where - depth) < 0.15  # the nearest sentence boundary to the asked depth


def test_passkey_found_reads_the_first_seven_digits():
    assert passkey_found(" 4827361.", "4827361")
    assert passkey_found(" 4,827,361 is it", "4827361")
    assert not passkey_found(" 4827362", "4827361")
    assert not passkey_found(" 1 4827361", "4827361")
    assert not passkey_found(" no idea", "4827361")


def test_mqar_sample_is_natural_tokenization_and_queries_every_key(tokenizer):
    words = single_token_words(tokenizer, 64)
    ids, positions = mqar_sample(tokenizer, words, 16, random.Random(0))
    text = tokenizer.decode(ids)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    pairs = dict(p.split(": ") for p in text.split(":", 1)[1].split(". The same")[0].strip().split(", "))
    assert len(pairs) == 16
    queried = text.split("again:", 1)[1]
    for position in positions:
        key, value = tokenizer.decode(ids[position - 1]).strip(), tokenizer.decode(ids[position + 1]).strip()
        assert pairs[key] == value
        assert f" {key}: {value}" in queried
    assert len(set(positions)) == 16


def test_run_recall_scores_both_models(pair):
    student, teacher, tokenizer = pair
    settings = RecallSettings(lengths=(96, 160), depths=(0.0, 1.0), trials=2, batch_size=4, mqar_pairs=(4, 8),
                              mqar_samples=2, answer_tokens=8)
    result = run_recall(student, teacher, tokenizer, settings)
    passkey, mqar = result["passkey"], result["mqar"]
    for name in ("student", "teacher"):
        assert len(passkey[name]) == 2 and all(len(row) == 2 for row in passkey[name])
        assert all(v in (0.0, 0.5, 1.0) for row in passkey[name] for v in row)  # 2 trials per cell
        assert len(mqar[name]) == 2 and all(0 <= v <= 1 for v in mqar[name])
    assert "relative" in passkey and "relative" in mqar
    table = recall_table(result)
    assert "passkey @160" in table and "MQAR 8 pairs" in table


@pytest.mark.slow
def test_embedded_teacher_passes_passkey_at_short_lengths():
    """The prompt format is one the real SmolLM2 teacher solves, so a hybrid's score means something."""
    from hybridize.evaluate.recall import run_passkey
    from hybridize.teacher import load_teacher

    teacher, tokenizer = load_teacher()
    settings = RecallSettings(lengths=(256,), depths=(0.0, 0.5, 1.0), trials=1, batch_size=3)
    assert run_passkey({"teacher": teacher}, tokenizer, settings, limit=8192)["teacher_mean"] == 1.0
