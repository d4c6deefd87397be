"""Training checkpoints: accelerate's state (model, optimizer, RNG) plus progress.json, written to a partial folder, then renamed.

A folder named step-NNNNNNNN is always complete: every process writes into .partial-step-NNNNNNNN, and the
main process renames it only after all have finished. A save that fails removes its partial folder; one
killed mid-save leaves it behind, and the next run that takes the output folder's lock removes it
(`run_lock.remove_stale_partials`).

Nothing in a checkpoint is unpickled with arbitrary classes: the model is safetensors, the progress is JSON,
and accelerate's optimizer and RNG files are read with `weights_only=True` (docs/distill.md, "Checkpoints").
"""

import json
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from ..atomic import write_json_atomic

_COMPLETE = re.compile(r"step-(\d{8})")
PARTIAL_PREFIX = ".partial-"
PROGRESS_FILE = "progress.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _COMPLETE.fullmatch(p.name))


def latest_checkpoint(folder: Path) -> Path | None:
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    return int(_COMPLETE.fullmatch(path.name).group(1))


def discard_from(folder: Path, step: int) -> None:
    """Remove the checkpoints taken after `step` or more optimizer steps: their weights are known bad (main process)."""
    for path in complete_checkpoints(folder):
        if checkpoint_step(path) >= step:
            shutil.rmtree(path)


def save_checkpoint(accelerator: Accelerator, folder: Path, step: int, keep_last: int, progress: dict) -> Path:
    """Save the state after `step` optimizer steps; keep the newest `keep_last` checkpoints. All processes call this.

    The newest checkpoint's weights have not produced a loss yet, so they are not known good: the one before it
    is kept as well, whatever `keep_last` says, so that a known-good checkpoint is always on disk.
    """
    final = folder / checkpoint_name(step)
    partial = folder / f"{PARTIAL_PREFIX}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        # safetensors for the model (accelerate drops the tied head's duplicate name; loading restores the tie).
        accelerator.save_state(str(partial), safe_serialization=True)
        if accelerator.is_main_process:
            write_json_atomic(partial / PROGRESS_FILE, progress)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # a run resumed before this step already wrote it once
            shutil.rmtree(final)
        partial.rename(final)
        for old in complete_checkpoints(folder)[:-max(keep_last, 2)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict:
    """Load the state saved in `path` into the prepared objects and return its progress. All processes call this."""
    accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    return json.loads((path / PROGRESS_FILE).read_text())
