"""Copied spans: where a span and its copy land, which blocks get one, and that training (not held-out) text gets it."""

import math

import datasets
import pytest
import torch
from distill_support import error_lines, metrics, tiny_recipe, write_recipe

from hybridize.distill.__main__ import main as distill_main
from hybridize.distill.copied_spans import copy_spans, span_draw
from hybridize.distill.data import BlockOrder, StageData
from hybridize.distill.recipe import CopiedSpans, parse_recipe
from hybridize.errors import UserError


def test_each_span_and_its_copy_fit_the_block_at_least_the_gap_apart():
    spans = CopiedSpans(share=1.0, tokens=7, min_gap=20)
    draws = [span_draw(position, 41, spans, seed=0) for position in range(2000)]
    assert all(d is not None for d in draws)
    for source, target in draws:
        assert 0 <= source and source + 7 + 20 <= target and target + 7 <= 41, (source, target)
    # 41 = 2 x 7 + 20 + 7: the source start takes each of its 8 places, and the tightest fit (gap exactly 20) occurs
    assert {s for s, _ in draws} == set(range(8)) and any(t - s - 7 == 20 for s, t in draws)


def test_the_share_of_blocks_with_a_span_is_the_configured_share():
    """Each block is drawn independently: over n blocks the count is binomial(n, share); 5 standard deviations."""
    n, share = 4000, 0.3
    spans = CopiedSpans(share=share, tokens=4, min_gap=8)
    count = sum(span_draw(position, 64, spans, seed=1) is not None for position in range(n))
    assert abs(count - n * share) < 5 * math.sqrt(n * share * (1 - share)), count


def test_the_draw_depends_on_the_seed_and_position_only():
    spans = CopiedSpans(share=0.5, tokens=4, min_gap=8)
    first = [span_draw(p, 64, spans, seed=3) for p in range(200)]
    assert first == [span_draw(p, 64, spans, seed=3) for p in range(200)]
    assert first != [span_draw(p, 64, spans, seed=4) for p in range(200)]
    assert first[50:] == [span_draw(p, 64, spans, seed=3) for p in range(50, 200)]


def test_copy_spans_writes_the_source_over_the_target_and_nothing_else():
    torch.manual_seed(0)
    blocks = torch.randint(0, 1000, (64, 48))
    spans = CopiedSpans(share=0.5, tokens=5, min_gap=10)
    copied = copy_spans(blocks, 100, spans, seed=0)
    assert not torch.equal(copied, blocks) and torch.equal(blocks, blocks.clone())
    changed = 0
    for row in range(64):
        draw = span_draw(100 + row, 48, spans, seed=0)
        if draw is None:
            assert torch.equal(copied[row], blocks[row])
            continue
        source, target = draw
        expected = blocks[row].clone()
        expected[target : target + 5] = blocks[row, source : source + 5]
        assert torch.equal(copied[row], expected)
        changed += 1
    assert 0 < changed < 64


def test_training_batches_carry_the_spans_by_stream_position_for_any_world_size():
    torch.manual_seed(0)
    rows = torch.randint(0, 1000, (23, 40))
    blocks = datasets.Dataset.from_dict({"input_ids": rows.tolist()}).with_format("torch")
    spans = CopiedSpans(share=0.5, tokens=4, min_gap=12)
    data = StageData(train=blocks, held_out=blocks, seq_len=40, order=BlockOrder(23, seed=0), copied_spans=spans,
                     seed=7)
    global_batch = 8
    for step in (0, 3):
        start = step * global_batch
        expected = copy_spans(rows[data.order.blocks(start, global_batch)], start, spans, seed=7)
        for world, micro in ((1, 8), (2, 2), (4, 1)):
            got = torch.cat([data.train_batch(step, m, micro, global_batch, rank, world)
                             for m in range(global_batch // (micro * world)) for rank in range(world)])
            assert torch.equal(got, expected), (world, micro)  # micro-major then rank: the stream's order
    assert torch.equal(torch.cat(data.eval_batches(4, 8, 0, 1)), rows[:8])  # held-out blocks as read


def test_recipe_errors_for_copied_spans_are_one_line():
    base = {"teacher": "t", "init": "i", "output_dir": "o",
            "stages": [{"name": "kd", "kind": "kd", "tokens": 10, "seq_len": 64, "global_batch_size": 1,
                        "micro_batch_size": 1, "lr": 1e-4}]}

    def with_spans(value):
        return {**base, "stages": [{**base["stages"][0], "copied_spans": value}]}

    assert parse_recipe(with_spans({"share": 0.25, "tokens": 8, "min_gap": 48})).stages[0].copied_spans == \
        CopiedSpans(share=0.25, tokens=8, min_gap=48)
    for value, message in (({"share": 0}, "stages[0].copied_spans.share: must be in (0, 1], got 0"),
                           ({"share": 0.5, "tokens": 0}, "stages[0].copied_spans.tokens: must be >= 1, got 0"),
                           ({"share": 0.5, "tokens": 8, "min_gap": 49},
                            "stages[0].copied_spans: a span of 8, a gap of 49 and the copy need 65 tokens, more "
                            "than seq_len 64")):
        with pytest.raises(UserError) as err:
            parse_recipe(with_spans(value))
        assert message in str(err.value)


def test_a_stage_trains_on_copied_spans_and_evaluates_on_the_held_out_text(tmp_path, tiny_models, text_file, capsys):
    """The same run with and without spans in stage 2: the same held-out loss at its start, another first train loss."""
    losses = {}
    for name, spans in (("plain", None), ("spans", {"share": 1.0, "tokens": 16, "min_gap": 24})):
        run = tmp_path / name
        raw = tiny_recipe(tiny_models, text_file, run, {"stages.1.copied_spans": spans})
        assert distill_main([str(write_recipe(tmp_path / f"{name}.yaml", raw)), "--max-steps", "1"]) == 0
        rows = [r for r in metrics(run) if r["stage_index"] == 1]
        losses[name] = ([r["loss"] for r in rows if r["split"] == "eval"][0],
                        [r["loss"] for r in rows if r["split"] == "train"][0])
    assert losses["spans"][0] == pytest.approx(losses["plain"][0], rel=1e-6)
    assert losses["spans"][1] != pytest.approx(losses["plain"][1], rel=1e-3)
    bad = tiny_recipe(tiny_models, text_file, tmp_path / "bad",
                      {"stages.1.copied_spans": {"share": 1.0, "min_gap": 64}})
    assert distill_main([str(write_recipe(tmp_path / "bad.yaml", bad))]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "stages[1].copied_spans: a span of 32, a gap of 64 and the copy need 128 tokens" in line
