"""`convert_to_folder`: teacher + plan -> a self-contained hybrid folder, written atomically, with its report.

Order of work, chosen so peak memory stays near one model copy:
1. load the teacher; run it once on the calibration batch, keeping each replaced layer's attention input/output
   and the teacher's log-probs; for the teacher-calibrated init, also on a second, disjoint batch of calibration
   text (the fitting batch): attention input/output and per-head attention statistics;
2. free the teacher, then stream its safetensors tensor by tensor into the hybrid's state (layer by layer), and fit
   the Mamba2 / GDN mixers to the fitting batch (convert/calibrate.py);
3. measure the hybrid against what was kept in 1, and write everything to a temporary folder renamed at the end.
"""

import json
import resource
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .. import __version__
from ..atomic import check_output_folder, staged_folder
from ..corpus import calibration_batch
from ..dtypes import dtype_name, stored_dtype
from ..errors import UserError
from ..publish.remote_code import add_remote_code
from ..teacher import load_teacher, teacher_folder, teacher_identity
from ..teacher_forcing import capture_mixer_io
from ..model.configuration_hybrid import STATEFUL_TYPES
from .build import check_teacher, convert_state, hybrid_config_from_teacher, model_from_state
from .calibrate import calibrate_student, teacher_calibration
from .init import InitOptions
from .plan import check_memory_outside_window, describe, has_window_memory, plan_headwise_kv_heads, resolve_plan
from .report import conversion_report, format_report, next_token_stats


class _SafetensorsReader:
    """Reads tensors one at a time from a folder's *.safetensors files; any unreadable file is a UserError."""

    def __init__(self, folder: Path):
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"{folder}: no *.safetensors weight files (other formats are not supported)")
        self._handles, self._where = [], {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise UserError(f"weight file {path} is unreadable or corrupt: {err}") from err
            self._handles.append(handle)
            self._where.update((key, handle) for key in handle.keys())

    def keys(self) -> list[str]:
        return sorted(self._where)

    def read(self, key: str) -> torch.Tensor:
        try:
            return self._where[key].get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise UserError(f"weight tensor {key} is unreadable or corrupt: {err}") from err


# The init `hybridize convert` and distillation use unless told otherwise: each Mamba2 / GDN layer an exact skip
# (zero gate), every head a ~100-token memory writing at 1/2. The teacher-calibrated options start 1.5-1.7
# nats/token closer to the teacher but train worse: distilled GDN and Mamba2 recipes end at a lower KL from this
# init (docs/conversion.md, "Trained, the order reverses").
CONVERT_DEFAULTS = InitOptions()


def fitting_batch(tokenizer, seq_len: int) -> torch.LongTensor:
    """The calibration text the teacher-calibrated init fits to: each domain's second held-out block, so the
    report (first blocks) measures the init on tokens it was not fitted on."""
    return calibration_batch(tokenizer, seq_len=seq_len, blocks_per_domain=2)[1::2]


def fitting_seq_len(config, calibration_seq_len: int) -> int:
    """How long the fitting text is. A window + memory layer's memory is fitted to what its window misses, which is
    nothing in text no longer than the window: the fit would scale the memory's output to zero, and with its
    memory_scale at zero as well, neither would ever get a gradient. So such plans fit on twice the window, where
    half the positions see past it."""
    if has_window_memory(config.layer_types):
        return max(calibration_seq_len, 2 * config.sliding_window)
    return calibration_seq_len


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def convert_to_folder(
    teacher_name: str | None, plan_spec, out_dir: str | Path, *, seed: int = 0, overwrite: bool = False,
    options: InitOptions = CONVERT_DEFAULTS, sink_tokens: int = 0, recurrent_rope: bool = False,
    memory_outside_window: bool = False, calibration_seq_len: int = 256, dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu", log=print,
) -> Path:
    """Write the converted hybrid to `out_dir` and return it; the report is also in out_dir/conversion.json.

    The hybrid is written in `dtype`, by default the dtype the teacher's weights are stored in; the report's forwards
    run on `device` in that dtype, so they measure the model as it was saved.
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite=overwrite)
    folder = teacher_folder(teacher_name)
    dtype = dtype or stored_dtype(folder)
    teacher, tokenizer = load_teacher(teacher_name, dtype=dtype, device=device)
    check_teacher(teacher.config)
    plan = resolve_plan(plan_spec, teacher.config.num_hidden_layers)
    check_memory_outside_window(plan, memory_outside_window)
    log("plan:\n" + describe(plan))
    config = hybrid_config_from_teacher(teacher.config, plan, dtype=dtype, sliding_window_sinks=sink_tokens,
                                        headwise_kv_heads=plan_headwise_kv_heads(plan_spec),
                                        recurrent_rope=recurrent_rope, memory_outside_window=memory_outside_window)
    generation_config = teacher.generation_config

    input_ids = calibration_batch(tokenizer, seq_len=calibration_seq_len, blocks_per_domain=1).to(device)
    log(f"teacher forward on {input_ids.numel()} calibration tokens ({dtype_name(dtype)}, {device})")
    replaced = [i for i, kind in enumerate(plan) if kind != "full_attention"]
    captured = capture_mixer_io(teacher, input_ids, replaced)
    with torch.no_grad():
        teacher_logprobs, teacher_nll = next_token_stats(teacher(input_ids=input_ids, use_cache=False).logits, input_ids)
    recurrent = [i for i, kind in enumerate(plan) if kind in STATEFUL_TYPES]
    fitting, statistics = {}, {}
    if options.uses_teacher and recurrent:
        log(f"teacher attention statistics for {len(recurrent)} recurrent layers")
        fitting_ids = fitting_batch(tokenizer, fitting_seq_len(config, calibration_seq_len)).to(device)
        fitting, statistics = teacher_calibration(teacher, fitting_ids, recurrent)
    del teacher

    log("building the hybrid from the teacher's weights" + (", then fitting output scales" if fitting else ""))
    student, dropped = build_hybrid(folder, config, options, seed, statistics, fitting, device)
    del fitting
    student.generation_config = generation_config
    log("measuring the hybrid against the teacher")
    report = conversion_report(student, captured, input_ids, teacher_logprobs, teacher_nll,
                               compare_zero_gate=options.gate != "zero")
    log(format_report(report))
    record = {
        "hybridize_version": __version__,
        "teacher": teacher_identity(teacher_name, record_folder=out_dir),
        "layer_types": plan,
        "headwise_kv_heads": config.headwise_kv_heads,
        "plan_spec": plan_spec if isinstance(plan_spec, str) else "list",
        "seed": seed,
        "init_options": vars(options),
        "sink_tokens": sink_tokens,
        "recurrent_rope": recurrent_rope,
        "memory_outside_window": memory_outside_window,
        "dtype": dtype_name(dtype),
        "dropped_teacher_tensors": dropped,
        "report": report,
    }
    _write_atomically(out_dir, student, tokenizer, record, overwrite)
    # Measured, not recorded: conversion.json is byte-reproducible for a given teacher, plan, seed and options.
    log(f"wrote {out_dir} ({dtype_name(dtype)}; peak RSS {_peak_rss_gib():.2f} GiB)")
    return out_dir


def build_hybrid(folder: Path, config, options: InitOptions, seed: int, statistics: dict, fitting: dict,
                 device: str | torch.device = "cpu"):
    """The hybrid of `config` from the teacher's weights in `folder`, its recurrent mixers initialized from the
    teacher's attention `statistics` and fitted to `fitting` (teacher_calibration's two results; a layer missing from
    `fitting` is not fitted), and the teacher tensors it dropped."""
    reader = _SafetensorsReader(folder)
    state, dropped = convert_state(reader.keys(), reader.read, config, options, seed, statistics)
    student = model_from_state(config, state).to(device)
    del state
    calibrate_student(student, fitting, options)
    return student, dropped


def _write_atomically(out_dir: Path, student, tokenizer, record: dict, overwrite: bool) -> None:
    """Everything goes to a hidden sibling folder first; only a complete folder is renamed into place."""
    with staged_folder(out_dir, replace=overwrite) as staging:
        student.save_pretrained(staging, max_shard_size="2GB")
        tokenizer.save_pretrained(staging)
        add_remote_code(staging)  # loadable without hybridize too (trust_remote_code=True)
        (staging / "conversion.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
