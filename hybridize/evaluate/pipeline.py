"""`evaluate_to_folder` and `bench_to_folder`: a hybrid folder (and its teacher) -> OUT/eval or OUT/bench.

What `hybridize eval` and `hybridize bench` run, callable from Python with plain arguments. Each loads the hybrid and
its teacher on one device in one dtype, measures, prints its tables through `log`, writes its files to a staging
folder that replaces OUT's earlier files only when complete (hybridize/atomic.py), and returns the record it wrote.
OUT defaults to HYBRID/eval or HYBRID/bench, which `hybridize push` puts on the model card.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..atomic import staged_folder, write_json_atomic
from ..device import pick_device
from ..dtypes import dtype_name
from .bench import BenchSettings, bench_tables, check_target_names, check_targets, run_bench
from .common import load_pair, output_folder, pick_dtype
from .lm_eval_tasks import lm_eval_table, require_harness, run_lm_eval
from .plots import plot_bench, plot_eval, plot_passkey
from .quality import QualitySettings, quality_table, run_quality
from .recall import RecallSettings, recall_table, run_recall


@dataclass(frozen=True)
class EvalSettings:
    """What `hybridize eval` measures; docs/evaluate.md says why each default is what it is."""

    quality: QualitySettings = field(default_factory=QualitySettings)
    recall: RecallSettings | None = field(default_factory=RecallSettings)  # None: no passkey or MQAR
    tasks: tuple[str, ...] = ()  # lm-eval task names or task YAML files; () runs none
    tasks_include: str | None = None  # a folder of extra lm-eval task YAMLs
    tasks_limit: int | None = None  # examples per task; None: all
    num_fewshot: int | None = None  # None: each task's own setting

    @classmethod
    def small(cls) -> "EvalSettings":
        """CPU-sized quality and recall settings (`--small`)."""
        return cls(quality=QualitySettings.small(), recall=RecallSettings.small())


def evaluate_to_folder(
    hybrid: str | Path, out_dir: str | Path | None = None, settings: EvalSettings | None = None, *,
    teacher: str | None = None, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
    overwrite: bool = False, log=print,
) -> dict:
    """Compare the hybrid with its teacher; write out_dir/{eval.json, eval.png, passkey.png} and return eval.json.

    settings None: the full-size EvalSettings() (EvalSettings.small() is `--small`). teacher None: the one the
    hybrid's record names, else the embedded default; "none": the hybrid alone. device None: cuda when available.
    dtype None: bfloat16 on a GPU, float32 on the CPU. out_dir None: HYBRID/eval, where an earlier run's files are
    replaced; a given folder that is not empty needs `overwrite`.
    """
    settings = settings or EvalSettings()
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    out_dir, replace = output_folder(hybrid, out_dir, "eval", overwrite)
    if settings.tasks:
        require_harness()
    student, teacher_model, tokenizer, teacher_name = load_pair(hybrid, teacher, dtype=dtype, device=device)
    log(f"hybrid {hybrid} vs teacher {teacher_name or '(none)'} on {device}, {dtype}")
    started = time.time()
    results = {"hybridize_version": __version__, "hybrid": str(hybrid), "teacher": teacher_name,
               "device": str(device), "dtype": dtype_name(dtype)}
    with torch.inference_mode():
        results["quality"] = run_quality(student, teacher_model, tokenizer, settings.quality, log)
    log(quality_table(results["quality"]))
    if settings.recall is not None:
        with torch.inference_mode():
            results["recall"] = run_recall(student, teacher_model, tokenizer, settings.recall, log)
        log("\n" + recall_table(results["recall"]))
    if settings.tasks:
        models = {"student": student} | ({"teacher": teacher_model} if teacher_model is not None else {})
        results["lm_eval"] = run_lm_eval(models, tokenizer, list(settings.tasks), include_path=settings.tasks_include,
                                         num_fewshot=settings.num_fewshot, limit=settings.tasks_limit,
                                         batch_size=settings.quality.batch_size)
        log("\n" + lm_eval_table(results["lm_eval"]))
    results["seconds"] = round(time.time() - started, 1)

    with staged_folder(out_dir, replace=replace) as staging:
        write_json_atomic(staging / "eval.json", results)
        plot_eval(results, staging / "eval.png")
        if "recall" in results:
            plot_passkey(results["recall"]["passkey"], staging / "passkey.png")
    log(f"\nwrote {out_dir}/eval.json, eval.png{', passkey.png' if 'recall' in results else ''} "
        f"({results['seconds']:.0f} s)")
    return results


def bench_to_folder(
    hybrid: str | Path, out_dir: str | Path | None = None, settings: BenchSettings | None = None, *,
    teacher: str | None = None, targets: Sequence[tuple[str, float]] = (), device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None, overwrite: bool = False, log=print,
) -> dict:
    """Time the hybrid and its teacher; write out_dir/{bench.json, bench.png} and return bench.json.

    settings None: the full-size BenchSettings(). targets: (ratio, value) pairs such as ("decode_speedup", 8.0),
    checked at every measured (context, batch) and kept under "targets", each with its "pass". teacher, device,
    dtype and out_dir as for evaluate_to_folder, with HYBRID/bench as the default folder.
    """
    settings = settings or BenchSettings()
    targets = list(targets)
    check_target_names(targets)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    out_dir, replace = output_folder(hybrid, out_dir, "bench", overwrite)

    student, teacher_model, tokenizer, teacher_name = load_pair(hybrid, teacher, dtype=dtype, device=device)
    log(f"hybrid {hybrid} vs teacher {teacher_name or '(none)'} on {device}, {dtype}")
    result = run_bench(student, teacher_model, settings, pad_token_id=tokenizer.pad_token_id, log=log)
    result |= {"hybridize_version": __version__, "hybrid": str(hybrid), "teacher": teacher_name}
    if targets:
        result["targets"] = check_targets(result["ratios"], targets)
    log("\n" + bench_tables(result))
    with staged_folder(out_dir, replace=replace) as staging:
        write_json_atomic(staging / "bench.json", result)
        plot_bench(result, staging / "bench.png")
    log(f"\nwrote {out_dir}/bench.json, bench.png")
    return result
