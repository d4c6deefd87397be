"""The needle trace: footprints are causal, an all-attention hybrid traces like its teacher, a fast-forgetting
recurrent layer loses the number, half-lives and the decay kept since the needle are what the weights give, the
attention on the number is what the model's own attention weights give."""

import copy
import math
import random

import pytest
import torch

from hybridize.evaluate.common import load_pair
from hybridize.evaluate.needle_trace import NUMBERS, _decaying_mixers, needle_trace
from hybridize.evaluate.recall import Haystack, passkey_prompt
from hybridize.model import HybridForCausalLM
from helpers import intra_layer_model, open_memory_branches

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


def test_half_lives_and_decay_kept_follow_the_weights(pair):
    """With the gate projections zeroed every head decays by its constant a = exp(-exp(A_log) softplus(dt_bias)):
    each half-life is ln 2 / -log a, and the decay kept at a chunk's end is a^(tokens since the needle's end)
    for the best head; an off-by-one in where the count starts or a head mix-up fails it."""
    student, teacher, tokenizer = pair
    model = copy.deepcopy(student)
    recurrent = {i: layer.mixer for i, layer in enumerate(model.model.layers)
                 if model.config.layer_types[i] in ("mamba2", "gated_deltanet")}
    log_a = {}
    with torch.no_grad():
        for i, mixer in recurrent.items():
            (mixer.a_proj if hasattr(mixer, "a_proj") else mixer.dt_proj).weight.zero_()
            mixer.A_log.copy_(torch.linspace(-4.0, -1.0, mixer.A_log.numel()))
            log_a[i] = -torch.exp(mixer.A_log) * torch.nn.functional.softplus(mixer.dt_bias)  # [H]
    trace = needle_trace(model, tokenizer, **SETTINGS)
    end = trace["needle"][1]
    for i, kind in enumerate(model.config.layer_types):
        if i not in recurrent:
            assert trace["half_life"][i] is None and all(row["decay_kept"][i] is None for row in trace["rows"])
            continue
        assert trace["half_life"][i] == pytest.approx([math.log(2) / -v for v in log_a[i].tolist()], rel=1e-5)
        for row in trace["rows"]:
            expected = max(0, row["tokens"] - end) * float(log_a[i].max()) / math.log(10)
            assert row["decay_kept"][i] == pytest.approx(expected, rel=1e-4, abs=1e-6), (i, row["tokens"])
    assert all(value is None for value in needle_trace(teacher, tokenizer, **SETTINGS)["half_life"])


def test_the_recurrent_branches_of_intra_layer_types_are_traced():
    model = intra_layer_model(windowed=False)
    mixers = _decaying_mixers(model)
    assert sorted(mixers) == list(range(len(model.config.layer_types)))
    assert all(mixer is model.model.layers[i].mixer.memory for i, mixer in mixers.items())


def test_the_memory_states_of_window_memory_layers_carry_the_number(pair):
    """A window + memory layer's memory branch has a state like a recurrent layer's: 0 before the needle, the
    number's footprint after it (its window keeps no state)."""
    student, _, tokenizer = pair
    config = copy.deepcopy(student.config)
    config.layer_types = [("window_gated_deltanet", "window_mamba2")[i % 2] for i in range(config.num_hidden_layers)]
    config.sliding_window = 16  # shorter than the needle's distance to the question
    torch.manual_seed(0)
    model = HybridForCausalLM(config).eval()
    open_memory_branches(model)
    trace = needle_trace(model, tokenizer, **SETTINGS)
    for row in _before_needle(trace):
        assert all(value == 0.0 for value in row["state"])
    assert all(value > 0 for value in trace["rows"][-1]["state"])


def test_attention_on_the_number_is_the_full_forwards_attention_weights(pair, identity_dir):
    """The trace rebuilds the last query from the cache path; the teacher's eager attention over the whole prompt at
    once gives the same weights (a wrong RoPE position, head order or GQA repeat would not)."""
    student, teacher, tokenizer = pair
    trace = needle_trace(teacher, tokenizer, **SETTINGS)
    start, end = trace["needle"]
    ids = passkey_prompt(tokenizer, Haystack(tokenizer, SETTINGS["length"]), SETTINGS["length"], SETTINGS["depth"],
                         random.Random(0), number=NUMBERS[0])[0]  # the trace's first prompt
    shared = teacher.config._attn_implementation  # the fixture's teacher is shared: put back what it had
    teacher.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = teacher(torch.tensor([ids]), output_attentions=True).attentions  # per layer [1, H, L, L]
    finally:
        teacher.set_attn_implementation(shared)
    expected = [float(a[0, :, -1, start:end].sum(-1).max()) for a in attentions]
    assert trace["needle_attention"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert 0 < min(expected) and max(expected) < 1
    hybrid = needle_trace(student, tokenizer, **SETTINGS)["needle_attention"]
    kept = [i for i, kind in enumerate(student.config.layer_types) if kind == "full_attention"]
    assert [value is not None for value in hybrid] == [i in kept for i in range(len(hybrid))]
    identity, _, _, _ = load_pair(identity_dir, None, dtype=torch.float32, device=torch.device("cpu"))
    assert needle_trace(identity, tokenizer, **SETTINGS)["needle_attention"] == pytest.approx(expected, rel=1e-4)
