"""Training checkpoints: accelerate's full state (model, optimizer, RNG, progress) written to a partial folder, then renamed.

A folder named step-NNNNNNNN is always complete: every process writes into .partial-step-NNNNNNNN, and the
main process renames it only after all have finished. A run killed mid-save leaves a partial folder that
is ignored and cleaned up on resume.
"""

import re
import shutil
from pathlib import Path

from accelerate import Accelerator

_COMPLETE = re.compile(r"step-(\d{8})")
PARTIAL_PREFIX = ".partial-"


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


def remove_partials(folder: Path) -> None:
    """Drop folders left by a save that never finished (main process only)."""
    if folder.is_dir():
        for path in folder.glob(f"{PARTIAL_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, folder: Path, step: int, keep_last: int) -> Path:
    """Save the state after `step` optimizer steps; keep the newest `keep_last` checkpoints. All processes call this."""
    final = folder / checkpoint_name(step)
    partial = folder / f"{PARTIAL_PREFIX}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # Pickled tensors rather than safetensors: tied embeddings share storage, which safetensors refuses.
    accelerator.save_state(str(partial), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # a run resumed before this step already wrote it once
            shutil.rmtree(final)
        partial.rename(final)
        for old in complete_checkpoints(folder)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
