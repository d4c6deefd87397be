"""Training checkpoints: accelerate's state (trained weights, optimizer, RNG) plus progress.json, written to a partial
folder, then renamed.

A checkpoint holds the weights the stage trains (and the model's buffers), not the frozen ones: those are the stage's
starting folder, which a resume reads again; the fp32 copy of a large student's frozen weights would otherwise
dominate every checkpoint. Under FSDP, accelerate writes every shard in its DCP format instead.

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
from accelerate.utils import DistributedType
from safetensors import safe_open

from ..atomic import write_json_atomic
from ..errors import UserError

_COMPLETE = re.compile(r"step-(\d{8})")
PARTIAL_PREFIX = ".partial-"
PROGRESS_FILE = "progress.json"
MODEL_FILE = "model.safetensors"  # accelerate's name for the first (here: the only) prepared model


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
    dropping = accelerator.register_save_state_pre_hook(_drop_frozen_weights)
    try:
        # safetensors for the model (accelerate drops the tied head's duplicate name; loading restores the tie).
        accelerator.save_state(str(partial), safe_serialization=True)
        if accelerator.is_main_process:
            write_json_atomic(partial / PROGRESS_FILE, progress)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        dropping.remove()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # a run resumed before this step already wrote it once
            shutil.rmtree(final)
        partial.rename(final)
        for old in complete_checkpoints(folder)[:-max(keep_last, 2)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, model) -> dict:
    """Load the state saved in `path` into the prepared objects (`model` the prepared one) and return its progress.
    All processes call this.

    The frozen weights are not in the file (they are already loaded from the stage's starting folder), so the
    model loads non-strictly, after a check that every trained weight is there."""
    if accelerator.distributed_type != DistributedType.FSDP:
        _check_trained_weights_present(model, path)
    accelerator.load_state(str(path), load_kwargs={"weights_only": True}, strict=False)
    return json.loads((path / PROGRESS_FILE).read_text())


def frozen_names(model) -> set[str]:
    """State-dict names of `model`'s frozen parameters, tied duplicates included."""
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _drop_frozen_weights(models: list, weights: list[dict], output_dir: str) -> None:
    """accelerate's save-state hook: `weights` holds each model's state dict (none under FSDP); edited in place."""
    for model, state in zip(models, weights):
        for name in frozen_names(model) & state.keys():
            del state[name]


def _check_trained_weights_present(model, path: Path) -> None:
    with safe_open(path / MODEL_FILE, framework="pt") as file:
        saved = set(file.keys())
    expected = set(model.state_dict()) - frozen_names(model)
    # accelerate saves one of two tied names; loading restores the tie, so either name is enough.
    missing = sorted(name for name in expected - saved if not _tied_partner_saved(model, name, saved))
    if missing:
        raise UserError(f"checkpoint {path} lacks {len(missing)} trained weight(s) of this stage, e.g. {missing[0]!r}; "
                        "it was not written by this run")


def _tied_partner_saved(model, name: str, saved: set[str]) -> bool:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    if name not in tensors:
        return False
    return any(other in saved and tensors[other] is tensors[name] for other in tensors)
