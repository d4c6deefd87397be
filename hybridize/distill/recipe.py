"""Distillation recipes: YAML bound to typed dataclasses; any unknown or invalid key is a UserError naming it.

A recipe names the teacher, the converted init (or a plan to convert first), the data, the stages (each with
its loss, trainable parameters, learning rates, token budget and sequence length), checkpoints and logging.
Relative input paths in a recipe file (teacher, init, plan, data.source) are read against the recipe's own
folder, so a recipe means the same from any working directory; output_dir and command-line values are
relative to the working directory (docs/distill.md, "Paths").
"""

import dataclasses
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from ..corpus import DOMAINS
from ..errors import UserError
from ..library import DEFAULT_ROOTS
from ..model.configuration_hybrid import LAYER_TYPES
from ..kernels.kd_rows import DIVERGENCES


class RecipeError(Exception):
    """A bad value at `key` (a dotted path such as `stages[1].lr`); turned into a UserError by load_recipe."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise RecipeError(key, message)


# Bounds on values that can only be mistakes. The largest lr is what AdamW's fp32 arithmetic still carries:
# its step, lr / (1 - beta1^t), overflows fp32 (3.4e38) above it; everything between a sane lr and this one
# is left to the trainer's divergence stop.
MAX_LR = 1e30
MAX_TOKENS = 10**15  # a thousand times the largest published pretraining budgets
MAX_SEQ_LEN = 2**20
MAX_BATCH = 2**20  # sequences per optimizer step
MAX_STEPS = 10**9


def _check_lr(value: float, key: str) -> None:
    _require(0 < value <= MAX_LR, key, f"must be in (0, {MAX_LR:g}], got {value:g}")


def _check_at_most(value: int, limit: int, key: str) -> None:
    _require(value <= limit, key, f"must be at most {limit:,}, got {value:,}")


@dataclass(kw_only=True)
class DataConfig:
    """Where the text comes from. `source`: "corpus" (the packaged offline corpus), "library" (the installed
    packages' sources and documentation, with prose; hybridize.library), a local .txt / .jsonl / .json / .parquet
    file or a folder of them, or a Hub dataset id (needs network)."""

    source: str = "corpus"
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))  # corpus domains, or library parts
    # library only: "stdlib", "site-packages" or folders
    roots: list[str] = field(default_factory=lambda: list(DEFAULT_ROOTS))
    subset: str | None = None  # Hub dataset configuration name
    split: str = "train"  # Hub dataset split
    text_field: str = "text"
    max_documents: int | None = None  # after the seeded shuffle (the first N of a streamed Hub dataset)
    held_out_fraction: float = 0.01  # of documents, split off before packing so no document is in both sets
    num_proc: int | None = None  # tokenizer processes
    # library only: each part's share of the training tokens; smaller parts are repeated to reach it
    part_shares: dict[str, float] = field(default_factory=dict)

    def check(self) -> None:
        for i, domain in enumerate(self.domains):
            _require(domain in DOMAINS, f"domains[{i}]", f"allowed values: {', '.join(DOMAINS)}; got {domain!r}")
        _require(len(self.roots) > 0, "roots", "name at least one of: stdlib, site-packages, a folder")
        _require(self.max_documents is None or self.max_documents >= 2, "max_documents", "must be >= 2")
        _require(0 <= self.held_out_fraction < 1, "held_out_fraction", "must be in [0, 1)")
        _require(self.num_proc is None or self.num_proc >= 1, "num_proc", "must be >= 1")
        if self.part_shares:
            _require(self.source == "library", "part_shares", "only the library source has parts; remove it "
                     f"or set data.source: library (got {self.source!r})")
            _require(set(self.part_shares) == set(self.domains), "part_shares",
                     f"give a share to each of the parts read ({', '.join(self.domains)}), and only to those")
            for part, share in self.part_shares.items():
                _require(0 < share <= 1, f"part_shares.{part}", f"must be in (0, 1], got {share:g}")
            total = sum(self.part_shares.values())
            _require(abs(total - 1) < 1e-6, "part_shares", f"shares must sum to 1, got {total:g}")


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA adapters (peft) on the teacher-kept linear layers, merged into the weights when the stage ends."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[Literal["attention", "mlp"]] = field(default_factory=lambda: ["attention", "mlp"])
    lr: float | None = None  # defaults to the lr of the layer the adapter sits in

    def check(self) -> None:
        _require(self.rank >= 1, "rank", "must be >= 1")
        _require(self.alpha > 0, "alpha", "must be > 0")
        _require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        _require(len(self.targets) > 0, "targets", "name at least one of: attention, mlp")
        _require(self.rank <= 65536, "rank", "must be at most 65536")
        if self.lr is not None:
            _check_lr(self.lr, "lr")


@dataclass(kw_only=True)
class CopiedSpans:
    """Training blocks in which a span of the text recurs further on, so that predicting the copy needs what was read
    `min_gap` or more tokens earlier (copied_spans.py, docs/distill.md "Copied spans"). Held-out blocks stay as read."""

    share: float  # of the stage's training blocks that get one copied span
    tokens: int = 32  # span length
    min_gap: int = 1024  # tokens between the end of the span and the start of its copy

    def check(self) -> None:
        _require(0 < self.share <= 1, "share", f"must be in (0, 1], got {self.share:g}")
        _require(self.tokens >= 1, "tokens", f"must be >= 1, got {self.tokens}")
        _require(self.min_gap >= 0, "min_gap", f"must be >= 0, got {self.min_gap}")


@dataclass(kw_only=True)
class StageConfig:
    """What every stage has: its budget, batch geometry and optimizer settings.

    global_batch_size counts sequences per optimizer step over all processes, so a run on 1 or 8 GPUs
    takes the same steps; gradient accumulation makes up the difference.
    """

    KIND: ClassVar[str] = ""
    name: str
    tokens: int
    seq_len: int
    global_batch_size: int
    micro_batch_size: int
    lr: float
    lr_by_layer_type: dict[str, float] = field(default_factory=dict)
    # The lr of the recurrent heads' half-life parameters (A_log, dt_bias); null: their layer's lr. AdamW moves a
    # parameter by about the sum of its lrs over a stage, so at the layer's lr a half-life can only stretch a
    # few tens of percent (docs/distill.md, "Learning rates").
    half_life_lr: float | None = None
    # The lr of window + memory and head-wise layers' recurrent branches (their memory mixer and memory_scale); null:
    # their layer's lr. memory_scale starts at zero, and AdamW moves it by at most about the sum of its lrs.
    memory_lr: float | None = None
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio over the stage
    weight_decay: float = 0.0  # matrices only; norms, biases and decay parameters are never decayed
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    # Window lengths drawn per optimizer step for the windows of window + memory layers (window_draws.py); null:
    # their own window throughout.
    train_windows: list[int] | None = None
    copied_spans: CopiedSpans | None = None  # null: the blocks as read

    def check(self) -> None:
        _require(self.name.replace("-", "").replace("_", "").isalnum(), "name", "use letters, digits, - and _")
        for key in ("tokens", "seq_len", "global_batch_size", "micro_batch_size"):
            _require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check_at_most(self.tokens, MAX_TOKENS, "tokens")
        _check_at_most(self.seq_len, MAX_SEQ_LEN, "seq_len")
        _check_at_most(self.global_batch_size, MAX_BATCH, "global_batch_size")
        _require(self.global_batch_size % self.micro_batch_size == 0, "global_batch_size",
                 f"must be a multiple of micro_batch_size ({self.micro_batch_size}), got {self.global_batch_size}")
        _check_lr(self.lr, "lr")
        for kind, lr in self.lr_by_layer_type.items():
            _require(kind in LAYER_TYPES, f"lr_by_layer_type.{kind}",
                     f"not a layer type; allowed: {', '.join(LAYER_TYPES)}")
            _check_lr(lr, f"lr_by_layer_type.{kind}")
        for key in ("half_life_lr", "memory_lr"):
            if getattr(self, key) is not None:
                _check_lr(getattr(self, key), key)
        _require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _check_at_most(self.warmup_steps, MAX_STEPS, "warmup_steps")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        # AdamW multiplies each weight by 1 - lr * weight_decay per step: above 1 the decay is no longer one.
        _require(0 <= self.weight_decay <= 1, "weight_decay", f"must be in [0, 1], got {self.weight_decay:g}")
        # beta1 = 0.9999 would already average over 10,000 steps; more can only be a slip of the finger.
        _require(len(self.betas) == 2 and all(0 <= b <= 0.9999 for b in self.betas), "betas",
                 f"must be two numbers in [0, 0.9999], got {self.betas}")
        _require(self.max_grad_norm is None or 0 < self.max_grad_norm <= 1e6, "max_grad_norm",
                 f"must be in (0, 1e6] (or null: no clipping), got {self.max_grad_norm}")
        if self.train_windows is not None:
            _require(len(self.train_windows) > 0 and all(isinstance(w, int) and w >= 1 for w in self.train_windows),
                     "train_windows", f"must be a list of window lengths >= 1, got {self.train_windows}")
        if self.copied_spans is not None:
            spans = self.copied_spans
            _require(2 * spans.tokens + spans.min_gap <= self.seq_len, "copied_spans",
                     f"a span of {spans.tokens}, a gap of {spans.min_gap} and the copy need "
                     f"{2 * spans.tokens + spans.min_gap} tokens, more than seq_len {self.seq_len}")

    def steps(self) -> int:
        """Optimizer steps that spend the token budget (the last one may overshoot it by less than a step)."""
        per_step = self.global_batch_size * self.seq_len
        return -(-self.tokens // per_step)


@dataclass(kw_only=True)
class AttentionOutputStage(StageConfig):
    """Stage 1: each replaced layer's mixer, fed the teacher's hidden state, matches the teacher's attention output.

    Trains the mixer parameters of every layer that is not full attention, and nothing else.
    """

    KIND: ClassVar[str] = "attention_output"
    kind: Literal["attention_output"]


@dataclass(kw_only=True)
class EndToEndStage(StageConfig):
    """What the stages that run both models end to end and match their next-token distributions share."""

    # fnmatch patterns on parameter names; "TYPE:pattern" matches only inside layers of that type
    trainable: list[str] = field(default_factory=lambda: ["model.layers.*"])
    temperature: float = 1.0
    kl_chunk_tokens: int = 2048  # tokens per chunk of the fused logits + KL (bounds its memory)
    lora: LoraConfig | None = None

    def check(self) -> None:
        super().check()
        _require(len(self.trainable) > 0 or self.lora is not None, "trainable",
                 "name at least one pattern (or use lora)")
        for i, pattern in enumerate(self.trainable):
            kind, sep, _ = pattern.rpartition(":")
            _require(not sep or kind in LAYER_TYPES, f"trainable[{i}]",
                     f"{kind!r} before ':' is not a layer type; allowed: {', '.join(LAYER_TYPES)}")
        _require(0 < self.temperature <= 100, "temperature", f"must be in (0, 100], got {self.temperature:g}")
        _require(self.kl_chunk_tokens >= 1, "kl_chunk_tokens", "must be >= 1")


@dataclass(kw_only=True)
class KDStage(EndToEndStage):
    """Stage 2: end-to-end forward KL(teacher || student) on next-token logits, plus an optional CE term."""

    KIND: ClassVar[str] = "kd"
    kind: Literal["kd"]
    ce_weight: float = 0.0

    def check(self) -> None:
        super().check()
        _require(0 <= self.ce_weight <= 1e3, "ce_weight", f"must be in [0, 1000], got {self.ce_weight:g}")


@dataclass(kw_only=True)
class OnPolicyStage(EndToEndStage):
    """On-policy distillation: the student continues prompts cut from the training text, the teacher scores the
    whole sequence, and a divergence on the student's own tokens is the loss; `on_policy_fraction` of the steps
    do that, the rest are teacher-forced KD steps with the same divergence (docs/distill.md, "On-policy stage")."""

    KIND: ClassVar[str] = "on_policy"
    kind: Literal["on_policy"]
    prompt_tokens: int = 64  # cut from the start of a training block
    new_tokens: int = 64  # generated by the student after each prompt (seq_len = prompt_tokens + new_tokens)
    sample_temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1: no nucleus cut
    divergence: Literal[DIVERGENCES] = "reverse_kl"
    jsd_beta: float = 0.5  # jsd only: the teacher's weight in the mixture
    on_policy_fraction: float = 1.0  # lambda: the share of steps that generate; the others are teacher-forced
    # who continues the prompts: the student (on-policy), or the teacher (sequence-level KD: the student learns
    # the teacher's own continuations, the path a greedy comparison with the teacher is decided on)
    generator: Literal["student", "teacher"] = "student"

    def check(self) -> None:
        super().check()
        for key in ("prompt_tokens", "new_tokens"):
            _require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _require(self.seq_len == self.prompt_tokens + self.new_tokens, "seq_len",
                 f"must equal prompt_tokens + new_tokens ({self.prompt_tokens} + {self.new_tokens} = "
                 f"{self.prompt_tokens + self.new_tokens}): teacher-forced steps train on blocks of the same length; "
                 f"got {self.seq_len}")
        _require(0 <= self.sample_temperature <= 100, "sample_temperature",
                 f"must be in [0, 100] (0: greedy), got {self.sample_temperature:g}")
        _require(self.top_k >= 0, "top_k", f"must be >= 0 (0: no limit), got {self.top_k}")
        _require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1] (1: no cut), got {self.top_p:g}")
        # At 0 or 1 the generalized JSD is identically 0; its limits are the two KLs, which have their own names.
        _require(0 < self.jsd_beta < 1, "jsd_beta",
                 f"must be in (0, 1) (forward_kl and reverse_kl are its limits), got {self.jsd_beta:g}")
        _require(0 <= self.on_policy_fraction <= 1, "on_policy_fraction",
                 f"must be in [0, 1], got {self.on_policy_fraction:g}")
        # the student generates with its own windows: a drawn one would cut its ring short
        _require(self.train_windows is None, "train_windows", "applies to attention_output and kd stages")


STAGE_KINDS = {cls.KIND: cls for cls in (AttentionOutputStage, KDStage, OnPolicyStage)}
Stage = AttentionOutputStage | KDStage | OnPolicyStage


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 2

    def check(self) -> None:
        _require(self.every_steps >= 1, "every_steps", "must be >= 1")
        _require(self.keep_last >= 1, "keep_last", "must be >= 1")
        _check_at_most(self.every_steps, MAX_STEPS, "every_steps")


@dataclass(kw_only=True)
class LoggingConfig:
    every_steps: int = 10  # to the trackers; metrics.jsonl gets every step
    # null: tensorboard when it is installed, else none, without a warning; a listed one that is missing warns
    trackers: list[Literal["tensorboard", "wandb"]] | None = None
    project: str = "hybridize-distill"
    eval_every_steps: int = 0  # 0: evaluate on the held-out set only before and after each stage
    eval_sequences: int = 32  # held-out sequences per evaluation, shared out over the processes

    def check(self) -> None:
        _require(self.every_steps >= 1, "every_steps", "must be >= 1")
        _require(self.eval_every_steps >= 0, "eval_every_steps", "must be >= 0")
        _require(self.eval_sequences >= 1, "eval_sequences", "must be >= 1")
        _check_at_most(self.eval_sequences, MAX_BATCH, "eval_sequences")


@dataclass(kw_only=True)
class Recipe:
    teacher: str
    output_dir: str
    stages: list[Stage]
    init: str | None = None  # a converted hybrid folder ...
    plan: str | list[str] | None = None  # ... or a plan (see hybridize.convert.plan): convert first
    # Conversion options: applied with a plan; with an init folder, one set away from its default must be what the
    # folder was converted with (checked at start).
    sink_tokens: int = 0  # sliding windows also keep each sequence's first this-many tokens
    # the share of each recurrent layer's heads given a 4096-token half-life (convert --init-long-heads)
    init_long_heads: float = 0.0
    # Mamba2 / GDN output gate, state decay and GDN write strength (convert --init-gate, --init-decay, --init-beta);
    # unset: the convert default (zero, slow, half)
    init_gate: Literal["zero", "random", "teacher"] | None = None
    init_decay: Literal["slow", "random", "teacher"] | None = None
    init_beta: Literal["half", "teacher"] | None = None
    recurrent_rope: bool = False  # Mamba2 / GDN layers rotate their C, B / q, k by RoPE (convert --recurrent-rope)
    # window + memory layers' memories read only the tokens that have left the window (convert --memory-outside-window)
    memory_outside_window: bool = False
    seed: int = 0
    mixed_precision: Literal["bf16", "no"] = "bf16"  # bf16 applies on GPU; CPU runs stay fp32
    compile: bool = True  # KD stages on one GPU or DDP: torch.compile each decoder layer; CPU and FSDP2 stay eager
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def check(self) -> None:
        _require((self.init is None) != (self.plan is None), "init",
                 "give exactly one of `init` (a converted folder) or `plan`")
        _require(self.sink_tokens >= 0, "sink_tokens", "must be >= 0")
        _check_at_most(self.sink_tokens, MAX_SEQ_LEN, "sink_tokens")
        _require(0.0 <= self.init_long_heads <= 1.0, "init_long_heads", "must be in [0, 1]")
        # With an init folder the decay is the folder's, checked against it at start (distill/export.py).
        _require(not self.init_long_heads or self.plan is None or self.init_decay == "teacher", "init_long_heads",
                 f"applies to init_decay: teacher, not {self.init_decay or 'slow (the default)'}")
        _require(len(self.stages) > 0, "stages", "list at least one stage")
        names = [stage.name for stage in self.stages]
        for i, name in enumerate(names):
            _require(names.index(name) == i, f"stages[{i}].name", f"{name!r} is used by an earlier stage")


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return f"a mapping to {_type_name(args[1])}"
    if _is_dataclass_type(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(tp, value, key: str):
    """`value` checked (and, for numbers written as strings such as 1e-4, converted) against type `tp`."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if all(getattr(a, "KIND", "") for a in options):
            return _bind_stage(value, key)
        if len(options) == 1:  # an optional value: its own error names the deeper key
            return _coerce(options[0], value, key)
        for option in options:
            try:
                return _coerce(option, value, key)
            except RecipeError:
                continue
        raise RecipeError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        _require(value in args, key, f"allowed values: {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        _require(isinstance(value, list), key, f"expected {_type_name(tp)}, got {value!r}")
        return [_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if value is None:  # `lr_by_layer_type: null` (or --set ...=null) clears a mapping
            return {}
        _require(isinstance(value, dict), key, f"expected {_type_name(tp)}, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if _is_dataclass_type(tp):
        return bind(tp, value, key)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads 1e-4 (no dot) as a string; accept any number spelled that way.
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float):
        _require(math.isfinite(value), key, f"must be a finite number, got {value!r}")
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    _require(ok, key, f"expected {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _bind_stage(value, key: str):
    _require(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
    kind = value.get("kind")
    _require(kind in STAGE_KINDS, f"{key}.kind", f"allowed values: {', '.join(STAGE_KINDS)}; got {kind!r}")
    return bind(STAGE_KINDS[kind], value, key)


def bind(cls, raw, key: str = ""):
    """An instance of dataclass `cls` from the mapping `raw`; unknown, missing or mistyped keys raise RecipeError."""
    prefix = f"{key}." if key else ""
    _require(isinstance(raw, dict), key or "recipe", f"expected a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in raw:
        _require(name in fields, f"{prefix}{name}", f"unknown key; allowed: {', '.join(fields)}")
    values = {}
    for name, spec in fields.items():
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], f"{prefix}{name}")
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{prefix}{name}", "required key is missing")
    obj = cls(**values)
    try:
        obj.check()
    except RecipeError as err:
        raise RecipeError(f"{prefix}{err.key}", str(err).split(": ", 1)[1]) from None
    return obj


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `--set a.b.0.c=VALUE` to the raw recipe mapping; VALUE is read as YAML (so 2, 1e-4, null, [a, b])."""
    path, sep, text = assignment.partition("=")
    if not sep or not path:
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE, e.g. stages.0.seq_len=256")
    parts = path.split(".")
    node = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"--set {path}: {where} is not an index of a list of {len(node)}")
            part = int(part)
        elif not isinstance(node, dict):
            raise UserError(f"--set {path}: {'.'.join(parts[:depth])} is not a mapping or list")
        if last:
            node[part] = yaml.safe_load(text)
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]


def smoke_overrides(raw: dict) -> list[str]:
    """`--smoke`: the recipe at CPU size (short sequences, 2-sequence batches, few documents), to check it runs."""
    overrides = ["data.max_documents=64", "data.held_out_fraction=0.1", "checkpoint.every_steps=1",
                 "logging.every_steps=1", "logging.eval_sequences=2"]
    for i, stage in enumerate(raw.get("stages") or []):
        seq_len = stage.get("seq_len") if isinstance(stage, dict) else None
        seq_len = min(seq_len, 128) if isinstance(seq_len, int) else 128
        if isinstance(stage, dict) and stage.get("kind") == OnPolicyStage.KIND:
            # Short continuations: the CPU decodes them token by token.
            prompt, new = (_smoke_length(stage, key, SMOKE_ON_POLICY_TOKENS) for key in ("prompt_tokens", "new_tokens"))
            overrides += [f"stages.{i}.prompt_tokens={prompt}", f"stages.{i}.new_tokens={new}"]
            seq_len = prompt + new
        overrides += [f"stages.{i}.seq_len={seq_len}", f"stages.{i}.global_batch_size=2",
                      f"stages.{i}.micro_batch_size=1"]
    return overrides


SMOKE_ON_POLICY_TOKENS = 16  # the most prompt tokens, and the most new tokens, of an on-policy stage in a smoke run


def _smoke_length(stage: dict, key: str, limit: int) -> int:
    value = stage.get(key, getattr(OnPolicyStage, key))
    return min(value, limit) if isinstance(value, int) and value >= 1 else limit


def _is_plan_file(plan) -> bool:
    return isinstance(plan, str) and plan.endswith(".json")  # as hybridize.convert.plan.resolve_plan reads it


def resolve_relative_paths(raw: dict, folder: Path) -> None:
    """Make the file's relative input paths relative to its `folder` (in place, before any --set override).

    `init` and a plan file are always paths. `teacher`, `data.source` and each of `data.roots` may also be an
    alias, a Hub id, "corpus" or "stdlib": they are taken as paths only when something exists at that place next
    to the recipe.
    """
    def anchored(value):
        return str(folder / value) if isinstance(value, str) and value and not Path(value).is_absolute() else value

    def anchored_if_present(value):
        return anchored(value) if isinstance(value, str) and Path(anchored(value)).exists() else value

    if "init" in raw:
        raw["init"] = anchored(raw["init"])
    if _is_plan_file(raw.get("plan")):
        raw["plan"] = anchored(raw["plan"])
    if "teacher" in raw:
        raw["teacher"] = anchored_if_present(raw["teacher"])
    data = raw.get("data")
    if isinstance(data, dict):
        if "source" in data:
            data["source"] = anchored_if_present(data["source"])
        if isinstance(data.get("roots"), list):
            data["roots"] = [root if root in DEFAULT_ROOTS else anchored_if_present(root) for root in data["roots"]]


def read_recipe(path: str | Path, overrides: list[str] = ()) -> dict:
    """The raw mapping of a recipe file (relative input paths anchored at its folder), with `--set` overrides applied."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise UserError(f"recipe {path}: cannot read it ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise UserError(f"recipe {path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path}: expected a mapping at the top level")
    resolve_relative_paths(raw, path.parent.absolute())
    for assignment in overrides:
        apply_override(raw, assignment)
    return raw


def parse_recipe(raw: dict, origin: str = "recipe") -> Recipe:
    try:
        return bind(Recipe, raw)
    except RecipeError as err:
        raise UserError(f"{origin}: {err}") from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and bind a recipe file; every problem is one UserError line naming the key."""
    return parse_recipe(read_recipe(path, overrides), f"recipe {path}")


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)
