"""What a run reports: metrics.jsonl (every step), the trackers (tensorboard, wandb) and a loss-curve PNG.

The progress bar lives in hybridize/progress.py, shared with the analyzer.
"""

import json
import math
import os
from pathlib import Path

from accelerate.utils import is_tensorboard_available, is_wandb_available

from ..atomic import write_text_atomic
from ..errors import UserError

_INSTALLED = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}


def usable_trackers(requested: list[str] | None) -> tuple[list[str], list[str]]:
    """(installed, missing) among the requested trackers: a missing one costs a warning, not the run.

    None (the recipe names none) is tensorboard when it is installed, else no tracker, and never a warning:
    metrics.jsonl and the loss-curve PNG are written either way.
    """
    if requested is None:
        return [name for name in ("tensorboard",) if _INSTALLED[name]()], []
    installed = [name for name in requested if _INSTALLED[name]()]
    return installed, [name for name in requested if name not in installed]


def missing_tracker_warning(name: str) -> str:
    return (f"warning: {name} is not installed; metrics go to metrics.jsonl and loss_curve.png only "
            f"(pip install {name})")


def flat_config(mapping: dict, prefix: str = "") -> dict:
    """A nested recipe as {dotted.key: scalar}: what tensorboard's hparams accept (lists become strings)."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, list):
            if value and all(isinstance(v, dict) for v in value):
                for i, item in enumerate(value):
                    flat.update(flat_config(item, f"{name}.{i}."))
            else:
                flat[name] = json.dumps(value)
        else:
            flat[name] = "null" if value is None else value
    return flat


class MetricsLog:
    """One JSON object per line: every train step and every evaluation (main process only writes)."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self) -> list[dict]:
        """Every complete row. A run killed mid-append leaves a torn last line (no newline): it is skipped."""
        if not self.path.exists():
            return []
        text = self.path.read_text()
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            lines.pop()
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{self.path} line {number} is not JSON ({err.msg}); it was not written by "
                                "hybridize distill") from None
        return rows

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, stage_index: int, step: int) -> None:
        """Forget rows a killed run wrote after the checkpoint it is resumed from (they will be redone)."""
        keep = [r for r in self.rows() if (r["stage_index"], r["step"]) <= (stage_index, step)]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))


def plot_loss_curve(rows: list[dict], path: Path) -> None:
    """One panel per stage: train loss per step (log scale) and held-out loss points; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted({(r["stage_index"], r["stage"]) for r in rows})
    if not stages:
        return
    figure, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 4), squeeze=False)
    for axis, (index, name) in zip(axes[0], stages):
        for split, style in (("train", "-"), ("eval", "o-")):
            points = [(r["step"], r["loss"]) for r in rows if r["stage_index"] == index and r["split"] == split
                      and math.isfinite(r["loss"]) and r["loss"] > 0]
            if points:
                axis.plot(*zip(*points), style, label=f"{split} loss", markersize=4)
        axis.set_title(f"stage {index + 1}: {name}")
        axis.set_xlabel("optimizer step")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    staging = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(staging, dpi=110)
    plt.close(figure)
    os.replace(staging, path)


GAP_TRAIN_STEPS = 10  # train steps averaged: one step's loss is too noisy to compare with a held-out mean


def held_out_gap(rows: list[dict]) -> dict | None:
    """Held-out minus train at a stage's end, on the KL where the stage reports one (KD), else on the loss.

    The train side is the mean of the last GAP_TRAIN_STEPS steps, the held-out side the last evaluation (the one
    run at the stage's end); a gap that grows over a run means the data is being memorized. None without both.
    """
    train = [r for r in rows if r["split"] == "train"][-GAP_TRAIN_STEPS:]
    evals = [r for r in rows if r["split"] == "eval"]
    if not train or not evals:
        return None
    metric = "kl" if all("kl" in r for r in train) and "kl" in evals[-1] else "loss"
    train_mean = sum(r[metric] for r in train) / len(train)
    return {"metric": metric, "train_last_steps": train_mean, "train_steps": len(train),
            "held_out_end": evals[-1][metric], "gap": evals[-1][metric] - train_mean}
