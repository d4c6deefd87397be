"""The distillation stages: which parameters train, their optimizer groups, LoRA, and each stage's forward and loss.

Stage 1 (attention_output) is teacher-forced: one teacher forward captures, for every replaced layer, the
hidden state its attention read and the attention output; each student mixer gets that input and is
pulled towards that output. Stage 2 (kd) runs both models end to end and matches next-token distributions.
An on_policy stage does the same on sequences the student continued itself (on_policy.py).
"""

import fnmatch
import re

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import LoraModel
from torch import nn

from ..errors import UserError
from ..losses import KDOptions, attention_output_loss, kd_loss, next_token_labels
from ..model.configuration_hybrid import BRANCH_TYPES
from ..model.modeling_hybrid import HALF_LIFE_PARAMETERS, MEMORY_BRANCH_PARAMETERS
from ..teacher_forcing import capture_mixer_io, student_mixer_outputs
from .merged_lora import MergedLoraLinear
from .on_policy import ContinuationSampler, TeacherContinuations
from .recipe import AttentionOutputStage, EndToEndStage, LoraConfig, OnPolicyStage, Stage

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LORA_ADAPTER = "default"


def replaced_layers(config) -> list[int]:
    """Layers whose mixer is not the teacher's full attention (sliding-window layers count: they get a new window)."""
    return [i for i, kind in enumerate(config.layer_types) if kind != "full_attention"]


def layer_type_of(name: str, layer_types: list[str]) -> str | None:
    match = _LAYER_INDEX.search(name)
    return layer_types[int(match.group(1))] if match else None


def trainable_names(student: nn.Module, stage: Stage) -> set[str]:
    """Names of the student's parameters that the stage trains (LoRA adapters come on top of these)."""
    names = [name for name, _ in student.named_parameters()]
    if isinstance(stage, AttentionOutputStage):
        prefixes = tuple(f"model.layers.{i}.mixer." for i in replaced_layers(student.config))
        chosen = {name for name in names if prefixes and name.startswith(prefixes)}
        if not chosen:
            raise UserError(f"stage {stage.name!r}: every layer of the student is full attention, so attention-output "
                            "matching has nothing to train")
        return chosen
    layer_types = student.config.layer_types
    chosen = set()
    for i, entry in enumerate(stage.trainable):
        kind, _, pattern = entry.rpartition(":")
        hits = {name for name in names if fnmatch.fnmatchcase(name, pattern)
                and (not kind or layer_type_of(name, layer_types) == kind)}
        if not hits:
            raise UserError(f"stage {stage.name!r}: trainable[{i}] {entry!r} matches no parameter "
                            f"(names look like {names[0]!r} or {names[-1]!r})")
        chosen |= hits
    return chosen


def lora_target_modules(layer_types: list[str], lora: LoraConfig, trained: set[str]) -> list[str]:
    """Teacher-kept linear layers to adapt: full-attention projections and MLPs, minus any trained in full anyway."""
    modules = []
    for i, kind in enumerate(layer_types):
        if "attention" in lora.targets and kind == "full_attention":
            modules += [f"model.layers.{i}.mixer.{p}" for p in ATTENTION_PROJECTIONS]
        if "mlp" in lora.targets:
            modules += [f"model.layers.{i}.mlp.{p}" for p in MLP_PROJECTIONS]
    return [m for m in modules if f"{m}.weight" not in trained]


def add_lora(student: nn.Module, stage: EndToEndStage, trained: set[str]) -> LoraModel:
    """Inject LoRA adapters (in place) into `student`; the returned LoraModel merges them back at the end."""
    targets = lora_target_modules(student.config.layer_types, stage.lora, trained)
    if not targets:
        raise UserError(f"stage {stage.name!r}: lora has nothing to adapt: every {' and '.join(stage.lora.targets)} "
                        "layer is already trained in full by `trainable`")
    config = PeftLoraConfig(r=stage.lora.rank, lora_alpha=stage.lora.alpha, lora_dropout=stage.lora.dropout,
                            target_modules=targets, bias="none")
    config._register_custom_module({nn.Linear: MergedLoraLinear})  # peft's layer, one GEMM a call (merged_lora.py)
    return LoraModel(student, config, LORA_ADAPTER)


def merge_lora(adapted: LoraModel) -> nn.Module:
    """The student with every adapter folded into its base weight (plain nn.Linear layers again)."""
    return adapted.merge_and_unload(progressbar=False)


def prepare_student(student: nn.Module, stage: Stage) -> LoraModel | None:
    """Freeze everything but the stage's trainable parameters (and LoRA adapters, added here); returns the LoraModel."""
    trained = trainable_names(student, stage)
    adapted = add_lora(student, stage, trained) if isinstance(stage, EndToEndStage) and stage.lora else None
    for name, param in student.named_parameters():
        param.requires_grad_(name in trained or (adapted is not None and ".lora_" in name))
    if stage.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()  # from_pretrained leaves eval mode, in which gradient checkpointing stays off
    return adapted


# Stage keys that act on two-branch layers only, and what of those layers each one sets.
BRANCH_KEYS = {"memory_lr": "the recurrent branch", "train_windows": "the windows"}


def check_branch_keys(stages: list[Stage], layer_types: list[str]) -> None:
    """memory_lr and train_windows act on two-branch layers only: asked for in a plan without one, they are a
    mistake (they would change nothing)."""
    if any(kind in BRANCH_TYPES for kind in layer_types):
        return
    for index, stage in enumerate(stages):
        for key, what in BRANCH_KEYS.items():
            if getattr(stage, key) is not None:
                raise UserError(f"stages[{index}].{key} applies to {what} of {', '.join(BRANCH_TYPES)} layers, "
                                "and the plan has none")


def parameter_groups(student: nn.Module, stage: Stage) -> list[dict]:
    """AdamW groups: lr by the layer type a parameter sits in (LoRA's own lr if set); the recurrent branches of
    two-branch layers (`memory_lr`, else their layer's lr) and the recurrent heads' half-life parameters
    (`half_life_lr`, else the lr they would have without it) in groups of their own, so that the groups are the same
    whatever lrs a resumed run is given; decay on matrices only."""
    layer_types = student.config.layer_types
    half_life, memory = re.compile(HALF_LIFE_PARAMETERS), re.compile(MEMORY_BRANCH_PARAMETERS)
    groups: dict[tuple, dict] = {}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        kind = layer_type_of(name, layer_types)
        lr = stage.lr_by_layer_type.get(kind, stage.lr)
        is_lora = ".lora_" in name
        label = "lora" if is_lora else (kind or "other")
        if is_lora:
            lr = lr if stage.lora.lr is None else stage.lora.lr
        else:
            if memory.search(name):
                label = f"{label} memory"
                lr = lr if stage.memory_lr is None else stage.memory_lr
            if half_life.search(name):
                label = f"{label} half-life"
                lr = lr if stage.half_life_lr is None else stage.half_life_lr
        decay = stage.weight_decay if param.ndim >= 2 else 0.0
        group = groups.setdefault((label, lr, decay), {"params": [], "lr": lr, "peak_lr": lr, "weight_decay": decay,
                                                       "label": label})
        group["params"].append(param)
    return list(groups.values())


class Distiller(nn.Module):
    """What accelerate prepares for a stage: the student, with the frozen teacher held beside it.

    The teacher sits in a tuple so that it is not a registered submodule: it is then neither wrapped for
    gradient sync, nor written into training checkpoints; the trainer places (or shards) it itself.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student = student
        self._frozen = (teacher,)

    @property
    def teacher(self) -> nn.Module:
        return self._frozen[0]

    @property
    def _no_split_modules(self) -> list[str]:
        """Module classes that FSDP2 (through accelerate) shards as units of their own."""
        return sorted({type(layer).__name__ for layer in self.student.model.layers} | self.extra_shard_units())

    def extra_shard_units(self) -> set[str]:
        return set()

    def forward(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """input_ids [B, T] -> (loss to minimize, {metric name: detached scalar})."""
        raise NotImplementedError


class AttentionOutputDistiller(Distiller):
    """Stage 1: sum over replaced layers of MSE(student mixer(teacher input), teacher attention output)."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__(student, teacher)
        self.layers = replaced_layers(student.config)

    def extra_shard_units(self) -> set[str]:
        # Mixers are called directly, outside their decoder layer, so under FSDP2 each needs its own unit.
        return {type(self.student.model.layers[i].mixer).__name__ for i in self.layers}

    def forward(self, input_ids):
        captured = capture_mixer_io(self.teacher, input_ids, self.layers)
        outputs = student_mixer_outputs(self.student, {i: x for i, (x, _) in captured.items()})
        loss, per_layer = attention_output_loss(outputs, {i: y for i, (_, y) in captured.items()})
        return loss, {f"mse/layer_{i:02d}": value.detach() for i, value in per_layer.items()}


class KDDistiller(Distiller):
    """Stage 2: forward KL(teacher || student) on next-token logits (+ ce_weight x CE), fused and token-chunked."""

    def __init__(self, student: nn.Module, teacher: nn.Module, options: KDOptions):
        super().__init__(student, teacher)
        self.options = options

    def forward(self, input_ids, loss_mask=None):
        """input_ids [B, T], loss_mask [B, T] bool (None: every position) -> (loss, metrics)."""
        with torch.no_grad():
            teacher_hidden = self.teacher.model(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, T, C]
        hidden = self.student.model(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, T, C]
        terms = kd_loss(
            hidden.flatten(0, 1), self.student.lm_head.weight, teacher_hidden.flatten(0, 1),
            self.teacher.lm_head.weight, next_token_labels(input_ids).flatten(), self.options,
            None if loss_mask is None else loss_mask.flatten(),
        )
        return terms.loss, {"kl": terms.kl, "ce": terms.ce}


class OnPolicyDistiller(KDDistiller):
    """The stage's divergence on a loss mask; called with sample_uniforms, the continuations of the stage's
    `generator` (the student, or the teacher) instead.

    Generation goes through forward so that DDP and FSDP2 see it as a forward of the prepared model (FSDP2
    gathers the sharded weights only inside one).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, stage: OnPolicyStage, static_decode: bool):
        options = KDOptions(temperature=stage.temperature, chunk_tokens=stage.kl_chunk_tokens,
                            divergence=stage.divergence, jsd_beta=stage.jsd_beta)
        super().__init__(student, teacher, options)
        self.sampler = (TeacherContinuations(teacher, stage) if stage.generator == "teacher"
                        else ContinuationSampler(student, stage, static_decode))

    def forward(self, input_ids, loss_mask=None, sample_uniforms=None):
        """input_ids [B, T] (and loss_mask [B, T]) -> (loss, metrics); with sample_uniforms [B, L], input_ids are
        prompts [B, P] and the result is the generator's sequences [B, P + L] (no gradient)."""
        if sample_uniforms is not None:
            return self.sampler(input_ids, sample_uniforms)
        loss, parts = super().forward(input_ids, loss_mask)
        return loss, {"divergence": parts["kl"]}


def build_distiller(stage: Stage, student: nn.Module, teacher: nn.Module, sharded: bool = False) -> Distiller:
    """The stage's Distiller; `sharded`: the student's weights will be FSDP2 shards (no static decode then)."""
    if isinstance(stage, AttentionOutputStage):
        return AttentionOutputDistiller(student, teacher)
    if isinstance(stage, OnPolicyStage):
        return OnPolicyDistiller(student, teacher, stage, static_decode=not sharded)
    options = KDOptions(temperature=stage.temperature, ce_weight=stage.ce_weight, chunk_tokens=stage.kl_chunk_tokens)
    return KDDistiller(student, teacher, options)
