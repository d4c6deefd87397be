"""Student folders: load one to train, and write one when a stage ends (weights gathered, LoRA merged, renamed into place)."""

import json
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoConfig

from ..atomic import staged_folder, write_json_atomic
from ..dtypes import stored_dtype
from ..errors import UserError
from ..model import HybridConfig, HybridForCausalLM
from ..publish.remote_code import add_remote_code
from .recipe import EndToEndStage, Recipe, Stage
from .stages import Distiller, add_lora, merge_lora, trainable_names


def check_student_folder(folder: Path) -> HybridConfig:
    """`folder`'s config; a UserError unless the folder holds a hybrid (read from its config only)."""
    if not (folder / "config.json").exists():
        raise UserError(f"{folder} is not a model folder (no config.json); `init` must name a "
                        "`hybridize convert` output")
    config = AutoConfig.from_pretrained(folder)
    if config.model_type != HybridConfig.model_type:
        raise UserError(f"{folder} holds a {config.model_type!r} model, not a hybrid; convert it first "
                        "(hybridize convert)")
    return config


def recorded_init_option(folder: Path, name: str) -> float | str | None:
    """The init option `name` (an InitOptions field) that `folder` was converted with, from its conversion.json
    (None without one)."""
    record = folder / "conversion.json"
    if not record.exists():
        return None
    try:
        return json.loads(record.read_text())["init_options"][name]
    except (json.JSONDecodeError, TypeError, KeyError):
        raise UserError(f"{record} is not a conversion record (no init_options.{name}); convert "
                        f"{folder} again") from None


def check_conversion_options(folder: Path, config: HybridConfig, recipe: Recipe) -> None:
    """With an `init` folder (whose config is `config`), the folder holds the conversion options. One that the recipe
    sets away from its default must be what the folder was converted with (its config; conversion.json for the
    init options): otherwise the run would train something else than the recipe says."""
    def recorded(name):
        return lambda: recorded_init_option(folder, name)

    held = {"recurrent_rope": (lambda: config.recurrent_rope, "--recurrent-rope"),
            "sink_tokens": (lambda: config.sliding_window_sinks, "--sink-tokens"),
            "memory_outside_window": (lambda: config.memory_outside_window, "--memory-outside-window"),
            "init_long_heads": (recorded("long_memory_heads"), "--init-long-heads"),
            "init_gate": (recorded("gate"), "--init-gate"),
            "init_decay": (recorded("decay"), "--init-decay"),
            "init_beta": (recorded("beta"), "--init-beta")}
    for key, (read, flag) in held.items():
        wanted = getattr(recipe, key)
        if not wanted:
            continue
        found = read()
        if found != wanted:
            how = "no conversion.json records it" if found is None else f"it was converted with {key} {found}"
            command = flag if wanted is True else f"{flag} {wanted}"
            raise UserError(f"recipe: {key}: {wanted}, but {folder} differs ({how}); convert it with "
                            f"`hybridize convert {command}`, give a `plan` instead of `init`, or leave {key} out")


def load_student(folder: Path) -> HybridForCausalLM:
    """A converted (or stage-distilled) hybrid in fp32, the precision its master weights train in."""
    check_student_folder(folder)
    return HybridForCausalLM.from_pretrained(folder, dtype=torch.float32)


def export_student(accelerator: Accelerator, distiller: Distiller, stage: Stage, source: Path, target: Path,
                   tokenizer, files: dict[str, dict]) -> None:
    """Write the trained student to `target` (save_pretrained, tokenizer, JSON `files`). All processes call this.

    The weights are gathered into a fresh CPU copy of the stage's starting model, with the same LoRA
    adapters injected, and loaded strictly; adapters are then merged, so the folder is a plain hybrid.
    """
    state = accelerator.get_state_dict(distiller)  # every process takes part when FSDP gathers shards
    if accelerator.is_main_process:
        student = load_student(source)
        with_lora = isinstance(stage, EndToEndStage) and stage.lora is not None
        adapted = add_lora(student, stage, trainable_names(student, stage)) if with_lora else None
        prefix = "student."
        student.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        if adapted is not None:
            student = merge_lora(adapted)
        # Trained in fp32; saved in the dtype the stage started from (the teacher's, unless convert chose another).
        student.cast_for_saving(stored_dtype(source))

        with staged_folder(target) as folder:
            student.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            add_remote_code(folder)  # loadable without hybridize too (trust_remote_code=True)
            for name, data in files.items():
                write_json_atomic(folder / name, data)
    accelerator.wait_for_everyone()
