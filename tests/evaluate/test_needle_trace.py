"""The needle trace: footprints are causal, an all-attention hybrid traces like its teacher, a fast-forgetting
recurrent layer loses the number."""

import copy

import pytest
import torch

from hybridize.evaluate.common import load_pair
from hybridize.evaluate.needle_trace import needle_trace

SETTINGS = {"length": 200, "depth": 0.5, "chunk": 40}


def _before_needle(trace):
    return [row for row in trace["rows"] if row["tokens"] <= trace["needle"][0]]


def test_footprints_are_causal_and_reach_the_question(pair):
    student, teacher, tokenizer = pair
    for model in (student, teacher):
        trace = needle_trace(model, tokenizer, **SETTINGS)
        assert len(_before_needle(trace)) >= 1
        for row in _before_needle(trace):
            assert all(value == 0.0 for value in row["residual"])
            assert all(value in (None, 0.0) for value in row["state"])
        assert all(value > 0 for value in trace["rows"][-1]["residual"])
    last = needle_trace(student, tokenizer, **SETTINGS)["rows"][-1]
    kinds = student.config.layer_types
    recurrent = [i for i, kind in enumerate(kinds) if kind in ("mamba2", "gated_deltanet")]
    assert recurrent and all(last["state"][i] > 0 and last["state_norm"][i] > 0 for i in recurrent)
    assert all(last["state"][i] is None for i in range(len(kinds)) if i not in recurrent)


def test_all_attention_hybrid_traces_like_its_teacher(identity_dir):
    student, teacher, tokenizer, _ = load_pair(identity_dir, None, dtype=torch.float32, device=torch.device("cpu"))
    ours, theirs = (needle_trace(model, tokenizer, **SETTINGS) for model in (student, teacher))
    assert ours["needle"] == theirs["needle"]
    for mine, reference in zip(ours["rows"], theirs["rows"]):
        # Footprints are ~1e-3 differences of hidden states that agree to fp32 rounding (~1e-6 relative).
        assert mine["residual"] == pytest.approx(reference["residual"], rel=1e-3, abs=1e-6)


def test_a_fast_forgetting_layer_loses_the_number(pair):
    student, _, tokenizer = pair
    layer = next(i for i, kind in enumerate(student.config.layer_types) if kind == "mamba2")
    kept = needle_trace(student, tokenizer, **SETTINGS)["rows"][-1]["state"][layer]
    forgetful = copy.deepcopy(student)
    mixer = forgetful.model.layers[layer].mixer
    with torch.no_grad():  # a = exp(-exp(A_log) * dt) ~ exp(-22026 * 5): the state holds only the last token
        mixer.A_log.fill_(10.0)
        mixer.dt_bias.fill_(5.0)
    lost = needle_trace(forgetful, tokenizer, **SETTINGS)["rows"][-1]["state"][layer]
    assert kept > 1e-4 and lost < 1e-6 * kept
