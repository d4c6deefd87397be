"""The training loop under accelerate: a recipe run stage by stage, resumable, on CPU, one GPU, DDP or FSDP2.

Layout of an output directory:
    run.json                      the recipe the run started with (a resume must match it)
    init/                         the converted student, when the recipe gives a plan
    checkpoints/<k>-<stage>/      step-NNNNNNNN folders of the stage in progress
    stages/<k>-<stage>/           the student after each stage but the last (the next stage starts from it)
    final/                        the student after the last stage, with distill.json (the run record)
    metrics.jsonl  loss_curve.png  logs/ (trackers)
    .lock                         held by the run in progress (run_lock.RunLock)

Failing safe: everything the run reads is checked before anything is written; a non-finite loss, gradient,
held-out loss or weight stops the run before a model is written, and removes the checkpoints whose weights
produced it; a full disk or running out of GPU memory stops it too. Each is one line naming the last good
checkpoint, exit code 2.
"""

import dataclasses
import json
import math
import shutil
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, parse_flag_from_env, set_seed
from torch import nn

from .. import __version__
from ..errors import UserError
from ..atomic import write_json_atomic
from ..convert.build import check_teacher
from ..convert.plan import check_memory_outside_window, resolve_plan
from ..model.compiling import compile_decoder_layers
from ..progress import progress_bar
from ..teacher import load_teacher, teacher_identity
from . import checkpoints
from .data import StageData, load_documents, stage_data
from .disk_space import SMALL_FILES, StageWrites, check_disk_room, folder_bytes, free_space, is_disk_full
from .export import check_conversion_options, check_student_folder, export_student, load_student
from .frozen_weights import frozen_weight_dtype, hold_frozen_linears
from .provenance import portable_data_record, portable_path, portable_recipe
from .on_policy import OnPolicyFeed
from .recipe import EndToEndStage, OnPolicyStage, Recipe, Stage, recipe_to_dict
from .run_lock import RunLock, holds_run_files, remove_stale_partials
from .stages import build_distiller, check_branch_keys, parameter_groups, prepare_student
from .window_draws import draw_window, trained_window, windows_to_draw
from .tracking import MetricsLog, flat_config, held_out_gap, missing_tracker_warning, plot_loss_curve, usable_trackers

# What a resumed run may change: where and how it reports, (say after a NaN) its learning-rate schedule, and (after
# running out of GPU memory) how each step's global batch is split and recomputed, which leaves the step's data and
# loss as they were (StageData.train_batch).
RESUMABLE_SECTIONS = ("output_dir", "checkpoint", "logging", "compile")
RESUMABLE_STAGE_KEYS = ("lr", "lr_by_layer_type", "half_life_lr", "memory_lr", "warmup_steps", "min_lr_ratio",
                        "max_grad_norm", "micro_batch_size", "gradient_checkpointing")


@dataclasses.dataclass
class Progress:
    """Where the run stands; saved in every checkpoint as progress.json."""

    stage: int = 0
    step: int = 0  # optimizer steps done in this stage
    tokens: int = 0  # training tokens consumed in this stage, over all processes


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def stage_folder(out: Path, recipe: Recipe, index: int) -> Path:
    last = index == len(recipe.stages) - 1
    return out / "final" if last else out / "stages" / f"{index}-{recipe.stages[index].name}"


def first_difference(old, new, key: str = "") -> tuple[str, object, object] | None:
    """The first dotted key where two nested recipe mappings differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for name in list(old) + [k for k in new if k not in old]:
            found = first_difference(old.get(name), new.get(name), f"{key}.{name}" if key else name)
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b, f"{key}[{i}]")
            if found:
                return found
        return None
    return None if old == new else (key, old, new)


def _fixed_part(recipe: dict) -> dict:
    """The recipe without what a resume may change."""
    fixed = {k: v for k, v in recipe.items() if k not in RESUMABLE_SECTIONS}
    fixed["stages"] = [{k: v for k, v in stage.items() if k not in RESUMABLE_STAGE_KEYS} for stage in recipe["stages"]]
    return fixed


@contextmanager
def tf32_matmuls(enabled: bool):
    """fp32 matmuls outside autocast (mixed_precision: no) run in tf32 while a run trains on a GPU. The flag is
    process-wide, so it is put back afterwards: code that runs after a run in the same process keeps fp32 matmuls."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled or saved
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


class Trainer:
    """One run of a recipe. Every process builds one; only the main process writes shared files."""

    def __init__(self, recipe: Recipe, *, resume: bool = False, max_steps: int | None = None):
        self.recipe, self.resume, self.max_steps = recipe, resume, max_steps
        self.out = Path(recipe.output_dir)
        # The launcher's --cpu reaches PartialState only through this flag (Accelerator reads it later, too late here).
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
        # bf16 autocast is for GPUs; a CPU run (smoke tests) stays in fp32, where the kernels' references run.
        mixed = recipe.mixed_precision if state.device.type == "cuda" else "no"
        self.trackers, missing = usable_trackers(recipe.logging.trackers)
        if state.is_main_process:
            for name in missing:
                print(missing_tracker_warning(name), file=sys.stderr)
        # Other processes wait at barriers while the main one converts the plan or prepares Hub data first,
        # which can take far longer than the default collective timeout.
        patience = InitProcessGroupKwargs(timeout=timedelta(hours=2))
        self.accelerator = Accelerator(mixed_precision=mixed, log_with=self.trackers or None,
                                       project_dir=str(self.out / "logs"), kwargs_handlers=[patience])
        reduce_gradients_in_fp32(self.accelerator)
        # Compiling pays off over a GPU run's thousands of steps; a CPU smoke run would spend minutes compiling.
        # FSDP2 runs stay eager: compiled layers under its hooks have not been tested on several GPUs.
        self.compiles = (recipe.compile and state.device.type == "cuda"
                         and self.accelerator.distributed_type != DistributedType.FSDP)
        self.main = self.accelerator.is_main_process
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self.progress = Progress()
        self.lock = RunLock(self.out) if self.main else None
        self.current: StageRun | None = None  # the stage in progress, which knows its last good checkpoint

    def log(self, message: str) -> None:
        self.accelerator.print(message)

    def run(self) -> Path:
        """Train every stage not yet done and return the final model folder."""
        try:
            with tf32_matmuls(self.accelerator.device.type == "cuda"):
                return self._run_stages()
        except torch.OutOfMemoryError as err:
            reason = str(err).splitlines()[0][:160]
            advice = (self.current.memory_advice() if self.current
                      else "before any stage trained; free the GPU of other jobs or use one with more memory")
            raise UserError(f"out of GPU memory ({reason}) {advice}") from None
        except Exception as err:
            if not is_disk_full(err):
                raise
            reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            kept = self.current.last_good() if self.current else "nothing was trained yet"
            raise UserError(f"the disk is full ({free_space(self.out)} under {self.out}; {reason}); "
                            f"training stopped, {kept}") from None
        finally:
            if self.lock:
                self.lock.release()

    def _run_stages(self) -> Path:
        set_seed(self.recipe.seed)
        if self.main and self.out.is_dir():
            self.lock.acquire()  # an existing folder may hold a run in progress: refuse at once, not after loading
        self._check_output_dir()
        runs = self._validate()
        self._take_output_dir()
        self._convert_plan()
        if self.trackers:
            self.accelerator.init_trackers(self.recipe.logging.project, config=flat_config(recipe_to_dict(self.recipe)))
        for index, stage in enumerate(self.recipe.stages):
            target = stage_folder(self.out, self.recipe, index)
            if index not in runs:
                self.log(f"stage {index + 1}/{len(self.recipe.stages)} {stage.name!r}: done earlier ({target})")
            else:
                self.current = runs[index]
                self.current.train()
                self.current = None
        self.accelerator.end_training()
        final = stage_folder(self.out, self.recipe, len(self.recipe.stages) - 1)
        self.log(f"final model: {final}")
        return final

    def _validate(self) -> dict[int, "StageRun"]:
        """Read and check everything the run needs before anything is written: a bad teacher, plan, init, data or
        batch geometry is one line and leaves the output folder as it was. Returns the stages still to train."""
        bf16 = self.accelerator.mixed_precision == "bf16"
        self.teacher, self.tokenizer = load_teacher(self.recipe.teacher, dtype=torch.bfloat16 if bf16 else torch.float32)
        if self.recipe.plan is not None:
            check_teacher(self.teacher.config)
            plan = resolve_plan(self.recipe.plan, self.teacher.config.num_hidden_layers)
            check_memory_outside_window(plan, self.recipe.memory_outside_window)
            init = self.out / "init"
        else:
            init = Path(self.recipe.init)
            init_config = check_student_folder(init)
            check_conversion_options(init, init_config, self.recipe)
            plan = init_config.layer_types
        check_branch_keys(self.recipe.stages, plan)
        if self.compiles and any(isinstance(stage, EndToEndStage) for stage in self.recipe.stages):
            compile_decoder_layers(self.teacher)
        place_teacher(self.teacher, self.accelerator)
        with self.accelerator.main_process_first():
            self.documents = load_documents(self.recipe.data, self.tokenizer, self.recipe.seed)
        runs, source = {}, init
        for index, stage in enumerate(self.recipe.stages):
            target = stage_folder(self.out, self.recipe, index)
            if not (target / "config.json").exists():
                runs[index] = StageRun(self, index, stage, source, target)
            source = target
        return runs

    def _take_output_dir(self) -> None:
        """Lock the output folder for the run's lifetime, check it again under the lock (another run may have
        started in it meanwhile), remove what killed runs left half-written, and record the starting recipe."""
        if self.main:
            self.lock.acquire()
            self._check_output_dir()
            remove_stale_partials(self.out, [self.out / "init"] + [stage_folder(self.out, self.recipe, i)
                                                                  for i in range(len(self.recipe.stages))])
            if not self.resume:
                write_json_atomic(self.out / "run.json",
                                  {"hybridize_version": __version__, "recipe": recipe_to_dict(self.recipe)})
        self.accelerator.wait_for_everyone()

    def _check_output_dir(self) -> None:
        """Only reads: a resume needs the run's recipe, a fresh run an empty (or missing) folder."""
        run_file = self.out / "run.json"
        recipe = recipe_to_dict(self.recipe)
        if self.resume:
            if not run_file.exists():
                raise UserError(f"--resume: {self.out} holds no run to resume (no run.json); start it without --resume")
            started = json.loads(run_file.read_text())["recipe"]
            changed = first_difference(_fixed_part(started), _fixed_part(recipe))
            if changed:
                key, old, new = changed
                raise UserError(f"--resume: the recipe's {key} is {new!r}, but the run in {self.out} started with "
                                f"{old!r}; resume with the same recipe or use another --out")
            adjusted = first_difference(started["stages"], recipe["stages"], "stages")
            if adjusted:
                self.log(f"resuming with a changed schedule, e.g. {adjusted[0]}: {adjusted[1]!r} -> {adjusted[2]!r}")
        elif holds_run_files(self.out):
            raise UserError(f"output directory {self.out} is not empty; pass --resume to continue its run, "
                            "or choose another --out")

    def _convert_plan(self) -> None:
        """With a plan, the teacher converted once (by the main process) into out/init, the first stage's start."""
        target = self.out / "init"
        if self.recipe.plan is not None and self.main and not (target / "config.json").exists():
            from ..convert.pipeline import CONVERT_DEFAULTS, convert_to_folder

            self.log(f"converting {self.recipe.teacher} with plan {self.recipe.plan!r} into {target}")
            chosen = {"gate": self.recipe.init_gate, "decay": self.recipe.init_decay, "beta": self.recipe.init_beta}
            options = dataclasses.replace(CONVERT_DEFAULTS, long_memory_heads=self.recipe.init_long_heads,
                                          **{name: value for name, value in chosen.items() if value is not None})
            convert_to_folder(self.recipe.teacher, self.recipe.plan, target, seed=self.recipe.seed, options=options,
                              sink_tokens=self.recipe.sink_tokens, recurrent_rope=self.recipe.recurrent_rope,
                              memory_outside_window=self.recipe.memory_outside_window,
                              device=self.accelerator.device, log=self.log)
        self.accelerator.wait_for_everyone()

    def record(self, final: Path, stages: list[dict]) -> dict:
        """distill.json: the recipe, teacher, data, init and what each stage did, for provenance."""
        versions = {package: __import__(package).__version__
                    for package in ("torch", "transformers", "accelerate", "peft", "datasets")}
        return {
            "hybridize_version": __version__,
            "recipe": portable_recipe(self.recipe, self.out),
            "teacher": teacher_identity(self.recipe.teacher, record_folder=final),
            "init": portable_path(self.recipe.init or self.out / "init", self.out),
            "data": portable_data_record(self.documents.record, self.out),
            "stages": stages,
            "processes": self.accelerator.num_processes,
            "distributed": str(self.accelerator.distributed_type),
            "mixed_precision": self.accelerator.mixed_precision,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "versions": versions,
            "model_folder": portable_path(final, self.out),
        }


def reduce_gradients_in_fp32(accelerator: Accelerator) -> None:
    """Under FSDP2 with bf16, compute in bf16 but reduce and accumulate gradients in fp32, as one GPU does.

    accelerate's bf16 policy reduces in bf16 too, and FSDP2 sums the gradients of `no_sync` micro batches in fp32
    only when reduce_dtype differs from param_dtype: with bf16 sums, the 2-GPU loss drifted up to 3% above the
    1-GPU loss (docs/distill.md). accelerate's fsdp2_prepare_model passes the plugin's policy to fully_shard as it
    is, so this must run before accelerator.prepare.
    """
    if not (accelerator.is_fsdp2 and accelerator.mixed_precision == "bf16"):
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.bfloat16)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch -> device. To a GPU from pinned memory: a copy from pageable memory first waits for every kernel
    already queued, which would stop the host from queueing the next micro batch while the GPU runs this one."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


def place_teacher(teacher: nn.Module, accelerator: Accelerator) -> None:
    """Put the frozen teacher on the device; under FSDP2, shard its decoder layers like the student's.

    Its output head stays whole on every process (untied from the embedding if tied): the chunked KD loss
    reads the head's weight directly, outside any FSDP forward that would gather it.
    """
    teacher.requires_grad_(False)
    if not accelerator.is_fsdp2:
        teacher.to(accelerator.device)
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if teacher.lm_head.weight is teacher.model.embed_tokens.weight:
        teacher.lm_head.weight = nn.Parameter(teacher.lm_head.weight.detach().clone(), requires_grad=False)
    mesh = accelerator.torch_device_mesh
    options = {"mp_policy": MixedPrecisionPolicy(param_dtype=teacher.dtype), "mesh": mesh}
    for layer in teacher.model.layers:
        fully_shard(layer, **options)
    fully_shard(teacher.model, **options)
    teacher.lm_head.to(accelerator.device)


class StageRun:
    """One stage: build the student, train it for its token budget (resuming if asked), and write it out."""

    def __init__(self, trainer: Trainer, index: int, stage: Stage, source: Path, target: Path):
        self.trainer, self.index, self.stage, self.source, self.target = trainer, index, stage, source, target
        self.accelerator = trainer.accelerator
        self.checkpoints = trainer.out / "checkpoints" / f"{index}-{stage.name}"
        world = self.accelerator.num_processes
        per_round = stage.micro_batch_size * world
        if stage.global_batch_size % per_round:
            raise UserError(f"stage {stage.name!r}: global_batch_size {stage.global_batch_size} is not a multiple of "
                            f"micro_batch_size x processes = {stage.micro_batch_size} x {world}")
        self.accumulation = stage.global_batch_size // per_round
        self.total_steps = stage.steps()
        self.stop = min(self.total_steps, trainer.max_steps) if trainer.max_steps else self.total_steps
        self.tokens_per_step = stage.global_batch_size * stage.seq_len
        self.global_offset = sum(s.steps() for s in trainer.recipe.stages[:index])
        # Packed now, while the run is still being checked: a seq_len the data cannot fill is an error at start.
        with self.accelerator.main_process_first():
            self.data: StageData = stage_data(trainer.documents, stage.name, stage.seq_len, stage.global_batch_size,
                                              trainer.recipe.seed, trainer.recipe.data.num_proc, stage.copied_spans)

    def train(self) -> None:
        trainer, stage, accelerator = self.trainer, self.stage, self.accelerator
        # The same seed on every process: LoRA's random init must agree where no broadcast happens (FSDP2).
        set_seed(trainer.recipe.seed + self.index)
        student = load_student(self.source)
        prepare_student(student, stage)
        held_dtype = frozen_weight_dtype(stage, accelerator.mixed_precision, accelerator.is_fsdp2)
        held = hold_frozen_linears(student, held_dtype) if held_dtype is not None else 0
        self.windows = windows_to_draw(student, stage.train_windows, stage.name)
        if trainer.compiles and isinstance(stage, EndToEndStage):
            compile_decoder_layers(student)  # stage 1 calls the mixers alone, outside their layers
        groups = parameter_groups(student, stage)
        self.peak_lrs = [group["peak_lr"] for group in groups]
        trained = sum(p.numel() for g in groups for p in g["params"])
        check_disk_room(trainer.out, stage.name, self._writes(student))
        distiller = build_distiller(stage, student, trainer.teacher, sharded=accelerator.is_fsdp2)
        self.feed = (OnPolicyFeed(stage, self.index, trainer.recipe.seed, trainer.tokenizer.eos_token_id,
                                  accelerator.num_processes) if isinstance(stage, OnPolicyStage) else None)
        optimizer = torch.optim.AdamW(groups, lr=stage.lr, betas=tuple(stage.betas), weight_decay=stage.weight_decay)
        self.model, self.optimizer = accelerator.prepare(distiller, optimizer)
        self._restore()
        trainer.log(
            f"stage {self.index + 1}/{len(trainer.recipe.stages)} {stage.name!r} ({stage.KIND}): "
            f"{self.total_steps} steps of {stage.global_batch_size} x {stage.seq_len} tokens"
            f"{f' (stopping after {self.stop})' if self.stop < self.total_steps else ''}, "
            f"{self.accumulation} micro batch(es) of {stage.micro_batch_size} per process per step, "
            f"{trained / 1e6:.2f}M trained parameters"
            f"{f', {held / 1e6:.2f}M frozen linear weights held in {accelerator.mixed_precision}' if held else ''}"
        )
        if trainer.progress.step == 0:
            self._check_held_out(self._evaluate(), "before the first step")
        self._loop()
        self._check_result()
        self._finish()

    def _writes(self, student: nn.Module) -> StageWrites:
        """What this stage will write: checkpoints hold the trained weights with AdamW's two moments (all weights
        under FSDP, whose sharded state keeps them), and the model folder is the size of the one it started from."""
        sharded = self.accelerator.distributed_type == DistributedType.FSDP
        saved = [p for p in student.parameters() if p.requires_grad or sharded]
        trained = [p for p in student.parameters() if p.requires_grad]
        checkpoint = (sum(p.numel() * p.element_size() for p in saved)
                      + 2 * sum(p.numel() * p.element_size() for p in trained) + SMALL_FILES)
        every, latest = self.trainer.recipe.checkpoint.every_steps, checkpoints.latest_checkpoint(self.checkpoints)
        start = checkpoints.checkpoint_step(latest) if latest and self.trainer.resume else 0
        saves = max(0, (self.stop - 1) // every - start // every)  # none at the last step: the model is written
        return StageWrites(checkpoint=checkpoint, saves=saves, held=max(self.trainer.recipe.checkpoint.keep_last, 2),
                           model=folder_bytes(self.source) + SMALL_FILES, existing=folder_bytes(self.checkpoints))

    def _restore(self) -> None:
        progress, accelerator = self.trainer.progress, self.accelerator
        latest = checkpoints.latest_checkpoint(self.checkpoints) if self.trainer.resume else None
        if latest is None:
            progress.stage, progress.step, progress.tokens = self.index, 0, 0
            if self.trainer.main:
                self.trainer.metrics.truncate_after(self.index, -1)
        else:
            for key, value in checkpoints.load_checkpoint(accelerator, latest, self.model).items():
                setattr(progress, key, value)
            # Loading restores the saved groups' settings; the schedule follows the recipe as given now.
            for group, peak_lr in zip(self.optimizer.param_groups, self.peak_lrs):
                group["peak_lr"] = peak_lr
            if progress.stage != self.index or progress.step != checkpoints.checkpoint_step(latest):
                raise UserError(f"checkpoint {latest} belongs to stage {progress.stage} step {progress.step}, "
                                f"not to stage {self.index}; it was not written by this run")
            self.trainer.log(f"resumed from {latest}")
            if self.trainer.main:
                self.trainer.metrics.truncate_after(self.index, progress.step)
        accelerator.wait_for_everyone()

    def _loop(self) -> None:
        bar = progress_bar(self.stop, self.trainer.progress.step, f"stage {self.index + 1} {self.stage.name}",
                           self.trainer.main)
        try:
            self._steps(bar)
        finally:
            bar.close()

    def _steps(self, bar) -> None:
        trainer, stage, accelerator, progress = self.trainer, self.stage, self.accelerator, self.trainer.progress
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = stage.max_grad_norm if stage.max_grad_norm is not None else float("inf")
        for step in range(progress.step, self.stop):
            started = time.perf_counter()
            factor = lr_factor(step, self.total_steps, stage.warmup_steps, stage.min_lr_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor
            window = draw_window(stage.train_windows, trainer.recipe.seed, self.index, step) if self.windows else None
            with trained_window(self.windows, window):
                loss, parts = self._accumulate(step)
            grad_norm = accelerator.clip_grad_norm_(trainable, max_norm)
            means = self._mean_over_processes(loss, parts)
            loss_value, grad_value = means.pop("loss"), float(grad_norm)
            if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                # The weights after `step` steps gave it: a checkpoint holding them is not good.
                what = f"loss is {loss_value}" if not math.isfinite(loss_value) else f"gradient norm is {grad_value}"
                self._stop(f"step {step + 1}: the {what}", first_bad=step)
            try:
                self.optimizer.step()
            except RuntimeError as err:
                if "overflow" not in str(err):
                    raise
                # AdamW's fp32 step cannot hold lr / (1 - beta1^t); the weights it started from gave a finite loss.
                self._stop(f"step {step + 1}: the optimizer step overflows ({str(err).splitlines()[0]})",
                           first_bad=step + 1)
            self.optimizer.zero_grad(set_to_none=True)
            progress.step, progress.tokens = step + 1, progress.tokens + self.tokens_per_step
            seconds = time.perf_counter() - started
            row = {"split": "train", "loss": loss_value, "grad_norm": grad_value, "lr": stage.lr * factor,
                   "tokens_per_s": self.tokens_per_step / seconds, "seconds": seconds, **means}
            if window is not None:
                row["train_window"] = window
            if self.feed:
                row.update(self.feed.step_metrics(step, seconds))
            if torch.cuda.is_available():
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            self._report(row, tracker=progress.step % trainer.recipe.logging.every_steps == 0)
            shown = {"gen_share": f"{row['generation_share']:.0%}"} if self.feed else {}
            bar.set_postfix(loss=f"{loss_value:.4g}", tok_s=f"{row['tokens_per_s']:,.0f}", **shown, refresh=False)
            bar.update(1)
            every_eval = trainer.recipe.logging.eval_every_steps
            if every_eval and progress.step % every_eval == 0 and progress.step < self.stop:
                self._check_held_out(self._evaluate(), f"after step {progress.step}")
            if progress.step % trainer.recipe.checkpoint.every_steps == 0 and progress.step < self.stop:
                checkpoints.save_checkpoint(accelerator, self.checkpoints, progress.step,
                                            trainer.recipe.checkpoint.keep_last, dataclasses.asdict(progress))

    def _accumulate(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward over this process's micro batches of `step`; mean loss and metrics, detached."""
        accelerator, stage = self.accelerator, self.stage
        loss_sum = torch.zeros((), device=accelerator.device)
        part_sums: dict[str, torch.Tensor] = {}
        for micro in range(self.accumulation):
            input_ids = self.data.train_batch(step, micro, stage.micro_batch_size, stage.global_batch_size,
                                              accelerator.process_index, accelerator.num_processes)
            # Gradients are synchronized only after the last micro batch.
            sync = micro == self.accumulation - 1
            input_ids = to_device(input_ids, accelerator.device)
            # An on_policy stage's student generates first (outside no_sync: no gradient flows there).
            inputs = (self.feed.inputs(self.model, step, micro, accelerator.process_index, input_ids) if self.feed
                      else {"input_ids": input_ids})
            with nullcontext() if sync else accelerator.no_sync(self.model):
                loss, parts = self.model(**inputs)
                accelerator.backward(loss / self.accumulation)
            loss_sum += loss.detach().float() / self.accumulation
            for name, value in parts.items():
                part_sums[name] = part_sums.get(name, 0) + value.float() / self.accumulation
        return loss_sum, part_sums

    def last_good(self) -> str:
        """Where a stopped run can continue from: the stage's newest checkpoint, or its starting model."""
        latest = checkpoints.latest_checkpoint(self.checkpoints)
        if latest:
            return f"the last good checkpoint is {latest} (--resume continues from it)"
        return f"no checkpoint of this stage was kept (--resume starts the stage again from {self.source})"

    def memory_advice(self) -> str:
        """What to change after the stage ran out of GPU memory, and where the run can continue from."""
        stage, key = self.stage, f"stages.{self.index}"
        fixes = [f"--set {key}.micro_batch_size=N below {stage.micro_batch_size} (the global batch of "
                 f"{stage.global_batch_size} stays: more micro batches accumulate)"]
        if isinstance(stage, EndToEndStage) and not stage.gradient_checkpointing:  # stage 1 runs no decoder layer
            fixes.append(f"--set {key}.gradient_checkpointing=true")
        return (f"in stage {stage.name!r} at micro batch {stage.micro_batch_size} x {stage.seq_len} tokens; "
                f"{' or '.join(fixes)}; training stopped, {self.last_good()}")

    def _stop(self, what: str, first_bad: int) -> None:
        """Stop every process with one line. The weights after `first_bad` or more steps produced something
        non-finite, so checkpoints holding them are removed first: the one named is good."""
        self.accelerator.wait_for_everyone()
        if self.trainer.main:
            checkpoints.discard_from(self.checkpoints, first_bad)
        self.accelerator.wait_for_everyone()
        raise UserError(f"stage {self.stage.name!r} {what}; training stopped, {self.last_good()}; "
                        "a lower lr may be set with --set when resuming")

    def _check_held_out(self, loss: float | None, when: str) -> None:
        if loss is not None and not math.isfinite(loss):
            self._stop(f"{when}: the held-out loss is {loss}", first_bad=self.trainer.progress.step)

    def _check_result(self) -> None:
        """Before the stage's model is written: the held-out loss (or, without held-out data, the loss of the last
        step's first micro batch) must be finite, and so must every trained weight."""
        step = self.trainer.progress.step
        loss = self._evaluate()
        if loss is None:
            batch = self.data.train_batch(step - 1, 0, self.stage.micro_batch_size, self.stage.global_batch_size,
                                          self.accelerator.process_index, self.accelerator.num_processes)
            with torch.no_grad():
                loss = self._mean_over_processes(self.model(to_device(batch, self.accelerator.device))[0], {})["loss"]
        self._check_held_out(loss, f"after step {step}")
        local = [getattr(p, "to_local", lambda p=p: p)().detach() for p in self.model.parameters() if p.requires_grad]
        bad = sum((~torch.isfinite(t)).sum().float() for t in local) if local else torch.zeros(())
        if self.accelerator.reduce(torch.as_tensor(bad, device=self.accelerator.device), "sum").item() > 0:
            self._stop(f"after step {step}: some trained weights are not finite", first_bad=step)

    @torch.no_grad()
    def _evaluate(self) -> float | None:
        """Mean loss and metrics over the held-out batches (the same count on every process), reported as split=eval;
        returns the mean loss, or None when there are no held-out sequences."""
        accelerator = self.accelerator
        batches = self.data.eval_batches(self.stage.micro_batch_size, self.trainer.recipe.logging.eval_sequences,
                                         accelerator.process_index, accelerator.num_processes)
        if not batches:
            return None
        loss_sum = torch.zeros((), device=accelerator.device)
        part_sums: dict[str, torch.Tensor] = {}
        sequences = sum(len(input_ids) for input_ids in batches)
        self.model.eval()
        for input_ids in batches:
            loss, parts = self.model(to_device(input_ids, accelerator.device))
            weight = len(input_ids) / sequences  # batch means, weighted by size: the last batch may be smaller
            loss_sum += loss.float() * weight
            for name, value in parts.items():
                part_sums[name] = part_sums.get(name, 0) + value.float() * weight
        self.model.train()
        means = self._mean_over_processes(loss_sum, part_sums)
        self._report({"split": "eval", **means}, tracker=True)
        return means["loss"]

    def _mean_over_processes(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> dict[str, float]:
        """{"loss": ..., **parts} averaged over processes: one all-reduce and one device sync for all of them."""
        names = ["loss", *parts]
        values = torch.stack([loss.float(), *(v.float() for v in parts.values())])
        return dict(zip(names, self.accelerator.reduce(values, "mean").tolist()))

    def _report(self, row: dict, tracker: bool) -> None:
        progress = self.trainer.progress
        row = {"stage": self.stage.name, "stage_index": self.index, "step": progress.step, "tokens": progress.tokens,
               **row}
        if self.trainer.main:
            self.trainer.metrics.append(row)
        if tracker:
            split = row["split"]
            numbers = {f"{self.stage.name}/{split}/{k}": v for k, v in row.items()
                       if isinstance(v, float) and k not in ("seconds",)}
            self.accelerator.log(numbers, step=self.global_offset + progress.step)

    def _finish(self) -> None:
        trainer = self.trainer
        rows = [r for r in trainer.metrics.rows() if r["stage_index"] == self.index] if trainer.main else []
        summary = self._summary(rows)
        files = {"stage.json": summary}
        final = self.index == len(trainer.recipe.stages) - 1
        if final and trainer.main:
            files["distill.json"] = trainer.record(self.target, self._earlier_summaries() + [summary])
            conversion = Path(trainer.recipe.init or trainer.out / "init") / "conversion.json"
            if conversion.exists():
                    files["conversion.json"] = json.loads(conversion.read_text())
        export_student(self.accelerator, self.model, self.stage, self.source, self.target, trainer.tokenizer, files)
        if trainer.main:
            plot_loss_curve(trainer.metrics.rows(), trainer.out / "loss_curve.png")
            if final:
                plot_loss_curve(trainer.metrics.rows(), self.target / "loss_curve.png")
            # The stage's result is written; its checkpoints only served to resume it.
            shutil.rmtree(self.checkpoints, ignore_errors=True)
            if self.checkpoints.parent.is_dir() and not any(self.checkpoints.parent.iterdir()):
                self.checkpoints.parent.rmdir()
        self.accelerator.wait_for_everyone()
        trainer.log(f"stage {self.stage.name!r} done: {self.target}")
        self.model, self.optimizer = self.accelerator.free_memory(self.model, self.optimizer)

    def _earlier_summaries(self) -> list[dict]:
        found = []
        for index in range(self.index):
            path = stage_folder(self.trainer.out, self.trainer.recipe, index) / "stage.json"
            if path.exists():
                found.append(json.loads(path.read_text()))
        return found

    def _summary(self, rows: list[dict]) -> dict:
        train = [r for r in rows if r["split"] == "train"]
        evals = [r for r in rows if r["split"] == "eval"]
        speeds = [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]
        return {
            "name": self.stage.name,
            "kind": self.stage.KIND,
            "steps_planned": self.total_steps,
            "steps_done": self.trainer.progress.step,
            "stopped_early_by_max_steps": self.stop < self.total_steps,
            "tokens": self.trainer.progress.tokens,
            "data": self.data.record(),
            "train_loss_last": train[-1]["loss"] if train else None,
            "eval_first": evals[0] if evals else None,
            "eval_last": evals[-1] if len(evals) > 1 else None,
            "held_out_gap": held_out_gap(rows),
            "tokens_per_s_median": statistics.median(speeds) if speeds else None,
            "peak_memory_gib": max((r["peak_memory_gib"] for r in train if "peak_memory_gib" in r), default=None),
            **(generation_summary(train) if self.feed else {}),
        }


def generation_summary(train: list[dict]) -> dict:
    """An on_policy stage's decode cost: its steps that generated, their median generated tokens/s, and the mean share
    of step time that generating took over those steps."""
    generating = [r for r in train if "generated_tokens_per_s" in r]
    return {
        "on_policy_steps": len(generating),
        "generated_tokens_per_s_median": statistics.median(r["generated_tokens_per_s"] for r in generating)
        if generating else None,
        "generation_share_mean": statistics.fmean(r["generation_share"] for r in generating) if generating else None,
    }
