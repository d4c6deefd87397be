"""scripts/mqar_past_window.py: its recall sequences ask for what has left the window, and a model that reads the
answers off those sequences scores as it should."""

from pathlib import Path

import torch
from helpers import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "mqar_past_window.py"


def test_each_answer_is_the_value_of_the_key_before_it_and_every_pair_is_past_the_window():
    script = load_script(SCRIPT)
    pairs, filler = 5, 11
    ids, labels = script.recall_batch(64, pairs, filler, torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape == (64, 4 * pairs + filler)
    for row_ids, row_labels in zip(ids.tolist(), labels.tolist()):
        stored = dict(zip(row_ids[0 : 2 * pairs : 2], row_ids[1 : 2 * pairs : 2]))
        assert len(stored) == pairs  # distinct keys: every question has one answer
        answered = [t for t, label in enumerate(row_labels) if label != -100]
        assert len(answered) == pairs
        for t in answered:
            assert row_labels[t] == row_ids[t] == stored[row_ids[t - 1]]
            # the pair sits at least `filler` tokens before its question
            assert t - 1 - row_ids.index(row_ids[t - 1]) > filler
        fill = row_ids[2 * pairs : 2 * pairs + filler]
        assert all(2 + script.KEYS + script.VALUES <= token < script.VOCAB for token in fill)


def test_answer_loss_scores_only_the_answers():
    script = load_script(SCRIPT)
    ids, labels = script.recall_batch(4, 3, 6, torch.Generator().manual_seed(1))

    class Oracle(torch.nn.Module):
        """Puts all its mass on the true next token: the answer loss is then ~0, whatever it does elsewhere."""

        def forward(self, input_ids):
            logits = torch.full((*input_ids.shape, script.VOCAB), -30.0)
            logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 30.0)
            return type("Out", (), {"logits": logits})

    class Wrong(Oracle):
        """Right everywhere except at the answers."""

        def forward(self, input_ids):
            out = super().forward(input_ids)
            answered = labels[:, 1:] != -100
            out.logits[:, :-1][answered] = torch.full((script.VOCAB,), -30.0).index_fill(0, torch.tensor([0]), 30.0)
            return out

    assert script.answer_loss(Oracle(), ids, labels).item() < 1e-6
    assert script.answer_loss(Wrong(), ids, labels).item() > 50
