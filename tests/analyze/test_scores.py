"""Measured scores: the residual-stream replay equals a real hybrid run end to end, and the joint layer-local fit
equals separate per-layer fits."""

import pytest
import torch
import torch.nn.functional as F

from hybridize.analyze.scores import (
    FitSettings, candidate_mixers, capture_held_out, fit_candidates, layer_scores, model_level,
)
from hybridize.convert.build import convert_model
from hybridize.teacher_forcing import capture_mixer_io, relative_error, teacher_forced_context

KINDS = ("mamba2", "gated_deltanet", "sliding_attention")


@pytest.mark.parametrize("swapped", [{2: "mamba2"}, {0: "gated_deltanet"}, {1: "sliding_attention", 3: "mamba2"}])
def test_replay_from_the_residual_stream_equals_the_hybrid_run_end_to_end(tiny_teacher, swapped):
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    base = convert_model(tiny_teacher, ["full_attention"] * 4)
    held_out = capture_held_out(tiny_teacher, ids)
    mixers = {}
    for i, kind in swapped.items():
        mixers[i] = candidate_mixers(tiny_teacher, kind, seed=0)[i]
        with torch.no_grad():  # move every parameter off its init, so the replaced layer is not a skip
            for param in mixers[i].parameters():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
    # a window of 16 < 40 tokens, so the sliding window really drops keys
    sliding = {i: m for i, m in mixers.items() if swapped[i] == "sliding_attention"}
    for mixer in sliding.values():
        mixer.window = 16
    kl, ppl_ratio = model_level(base, held_out, mixers, torch.float32)
    layer_types = [swapped.get(i, "full_attention") for i in range(4)]
    hybrid_kl, hybrid_ratio = end_to_end(tiny_teacher, ids, layer_types, mixers, sliding)
    assert kl > 1e-4  # the comparison is not between two unchanged teachers
    assert kl == pytest.approx(hybrid_kl, rel=1e-4)
    assert ppl_ratio == pytest.approx(hybrid_ratio, rel=1e-5)
    assert model_level(base, held_out, {}, torch.float32) == pytest.approx((0.0, 1.0), abs=1e-6)


def end_to_end(teacher, ids, layer_types, mixers, sliding):
    """(KL(teacher||hybrid) over all positions, ppl ratio) of a real converted hybrid holding `mixers`' weights."""
    hybrid = convert_model(teacher, layer_types)
    for i in sliding:
        hybrid.model.layers[i].mixer.window = 16
    for i, mixer in mixers.items():
        hybrid.model.layers[i].mixer.load_state_dict(mixer.state_dict())
    with torch.no_grad():
        student = F.log_softmax(hybrid(ids, use_cache=False).logits.double(), -1)  # [B, T, V]
        reference = F.log_softmax(teacher(ids, use_cache=False).logits.double(), -1)  # [B, T, V]
    kl = (reference.exp() * (reference - student)).sum(-1).mean()
    targets = ids[:, 1:, None]
    nll_gap = (reference[:, :-1].gather(-1, targets) - student[:, :-1].gather(-1, targets)).mean()
    return kl.item(), nll_gap.exp().item()


def test_joint_fit_of_all_layers_equals_separate_fits_and_moves_towards_the_teacher(tiny_teacher):
    blocks = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(2))
    base = convert_model(tiny_teacher, ["full_attention"] * 4)
    settings = FitSettings(steps=6, batch_blocks=1, lr=1e-3)
    joint = {kind: candidate_mixers(tiny_teacher, kind, seed=0) for kind in ("mamba2", "gated_deltanet")}
    fit_candidates(tiny_teacher, base, joint, blocks, settings, torch.float32)
    for kind, layer in (("mamba2", 1), ("gated_deltanet", 3)):
        alone = candidate_mixers(tiny_teacher, kind, seed=0)[layer]
        x0, y0 = capture_mixer_io(tiny_teacher, blocks[:1], [layer])[layer]
        context = teacher_forced_context(base, x0)
        with torch.no_grad():
            error_before = relative_error(alone(x0, context), y0)
        optimizer = torch.optim.AdamW(alone.parameters(), lr=1e-3, weight_decay=0.0)
        for step in range(6):
            x, y = capture_mixer_io(tiny_teacher, blocks[step:step + 1], [layer])[layer]
            loss = F.mse_loss(alone(x, teacher_forced_context(base, x)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for name, param in alone.named_parameters():
            torch.testing.assert_close(joint[kind][layer].get_parameter(name), param, rtol=1e-5, atol=1e-6,
                                       msg=f"{kind} layer {layer} {name}")
        with torch.no_grad():
            assert relative_error(alone(x0, context), y0) < error_before - 0.01


def test_layer_scores_are_per_layer_replacements(tiny_teacher):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    base = convert_model(tiny_teacher, ["full_attention"] * 4)
    held_out = capture_held_out(tiny_teacher, ids)
    candidates = {kind: candidate_mixers(tiny_teacher, kind, seed=0) for kind in KINDS}
    scores = layer_scores(base, held_out, candidates, torch.float32)
    for kind in KINDS:
        assert len(scores[kind]["kl"]) == 4
        for i in range(4):
            assert scores[kind]["kl"][i] == model_level(base, held_out, {i: candidates[kind][i]}, torch.float32)[0]
    # sliding window 512 > 24 tokens: identical to attention; the zero-gated recurrent mixers start as skips
    assert max(scores["sliding_attention"]["kl"]) < 1e-6
    assert scores["sliding_attention"]["rel_error"] == pytest.approx([0.0] * 4, abs=1e-5)
    assert scores["mamba2"]["rel_error"] == pytest.approx([1.0] * 4)
    assert min(scores["gated_deltanet"]["kl"]) > 1e-4
    x = base.model.layers[2].input_layernorm(held_out.layer_inputs[2])
    with torch.no_grad():
        attention = base.model.layers[2].mixer(x, teacher_forced_context(base, x))
        teacher_attention = capture_mixer_io(tiny_teacher, ids, [2])[2][1]
    assert relative_error(attention, teacher_attention) < 1e-5


def test_sink_windows_are_scored_as_sink_windows(tiny_teacher):
    """--sink-tokens reaches the window candidates: past the 512-token window, 2 sinks change every layer's KL."""
    ids = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(4))
    base = convert_model(tiny_teacher, ["full_attention"] * 4)
    held_out = capture_held_out(tiny_teacher, ids)
    kl = {}
    for sinks in (0, 2):
        mixers = candidate_mixers(tiny_teacher, "sliding_attention", seed=0, sink_tokens=sinks)
        assert [m.sinks for m in mixers] == [sinks] * 4
        scores = layer_scores(base, held_out, {"sliding_attention": mixers}, torch.float32)
        kl[sinks] = scores["sliding_attention"]["kl"]
    assert all(abs(a - b) > 1e-9 for a, b in zip(kl[0], kl[2]))


def test_window_memory_candidates_start_as_their_window_and_the_fit_opens_the_memory(tiny_teacher):
    """A window + GDN candidate scores exactly as the window at its init (memory held at zero); the layer-local fit
    then opens the memory in every layer, and its weights train too (a memory whose own gate also started at zero
    would get no gradient through either)."""
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(5))
    base = convert_model(tiny_teacher, ["full_attention"] * 4)
    held_out = capture_held_out(tiny_teacher, ids)
    candidates = {kind: candidate_mixers(tiny_teacher, kind, seed=0)
                  for kind in ("sliding_attention", "window_gated_deltanet")}
    for window, hybrid in zip(candidates["sliding_attention"], candidates["window_gated_deltanet"]):
        window.window = hybrid.window.window = 16  # shorter than the blocks, so the windows drop keys
    scores = layer_scores(base, held_out, candidates, torch.float32)
    assert scores["window_gated_deltanet"] == scores["sliding_attention"]
    assert min(scores["sliding_attention"]["kl"]) > 1e-5
    hybrids = candidates["window_gated_deltanet"]
    before = [mixer.memory.q_proj.weight.clone() for mixer in hybrids]
    blocks = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(6))
    fit_candidates(tiny_teacher, base, {"window_gated_deltanet": hybrids}, blocks,
                   FitSettings(steps=3, batch_blocks=1, lr=1e-3), torch.float32)
    for mixer, weight in zip(hybrids, before):
        assert mixer.memory_scale.abs().max() > 1e-4
        assert (mixer.memory.q_proj.weight - weight).abs().max() > 1e-4
