"""Shorter windows for window + memory layers in training (a stage's `train_windows`, docs/distill.md).

Trained with its full window, a window + memory layer's window answers everything within it, so its memory is asked
only for what lies further back: on training text that is little, and the memory learns little retrieval (the
converted constant-memory plan finds no needle past its windows, docs/results.md). With `train_windows`, each optimizer
step draws one window length from the list for every such layer's window, so on steps with a short window the memory
must carry what the window no longer sees. Held-out evals during training, the saved model, eval and decoding keep
the model's own window. Short windows in training to strengthen a recurrent memory are the idea of SWAX (arXiv
2509.24552); here it applies to the window of each two-branch layer, not to layers of their own.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import UserError
from ..model.window_memory import WindowMemoryMixer


def branch_windows(model: nn.Module) -> list[nn.Module]:
    """The attention modules that are the window of a window + memory or head-wise layer (head-wise layers without a
    window, whose attention heads are full, are left out)."""
    return [m.window for m in model.modules() if isinstance(m, WindowMemoryMixer) and m.window.window is not None]


def windows_to_draw(student: nn.Module, lengths: list[int] | None, stage: str) -> list[nn.Module]:
    """The windows a stage with `train_windows` = lengths draws for (none without it); one line where the lengths
    cannot apply to this student's windows."""
    if lengths is None:
        return []
    windows = branch_windows(student)
    if not windows:
        raise UserError(f"stage {stage!r}: train_windows needs window + memory or windowed head-wise layers; "
                        "this student has none")
    shortest = min(w.window for w in windows)
    if max(lengths) > shortest:
        raise UserError(f"stage {stage!r}: train_windows {lengths} holds a window longer than the model's "
                        f"({shortest}): a training window can only be shorter")
    return windows


def draw_window(lengths: list[int], seed: int, stage_index: int, step: int) -> int:
    """The window length of one optimizer step, uniform over `lengths`: a function of (seed, stage, step) alone, so a
    resumed run draws what the uninterrupted one drew."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + stage_index) * 1_000_003 + step)
    return lengths[int(torch.randint(len(lengths), (1,), generator=generator))]


@contextmanager
def trained_window(windows: list[nn.Module], length: int | None) -> Iterator[None]:
    """Every module of `windows` attends `length` tokens back inside the block (None: its own window)."""
    kept = [w.window for w in windows]
    try:
        if length is not None:
            for module in windows:
                module.window = length
        yield
    finally:
        for module, window in zip(windows, kept):
            module.window = window
