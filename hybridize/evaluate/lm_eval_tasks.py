"""lm-evaluation-harness tasks for the hybrid and its teacher, through the harness's own HF model wrapper (HFLM).

A task is a harness task name, or a path to a task YAML file. A YAML whose dataset is local (e.g.
`dataset_path: json` with `dataset_kwargs: {data_files: ...}`) runs fully offline. lm-eval is an optional
dependency (`pip install "hybridize[lm-eval]"`); without it, asking for tasks is a one-line error.
"""

import importlib.util
from pathlib import Path

from ..errors import UserError
from .common import format_table

INSTALL_HINT = 'lm-eval tasks need the lm-eval package: pip install "hybridize[lm-eval]"'


def require_harness() -> None:
    """Fail before any work when tasks are asked for but lm-eval is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(INSTALL_HINT)


def _harness():
    require_harness()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    return lm_eval, HFLM, TaskManager


def run_lm_eval(
    models: dict, tokenizer, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
    limit: int | None = None, batch_size: int = 8,
) -> dict:
    """{model name: {task: {metric: value}}} for each of `models` ({"student": ..., "teacher": ...})."""
    lm_eval, HFLM, TaskManager = _harness()
    # Built-in tasks are indexed only when a name (not a file) asks for one: indexing them all takes seconds.
    builtin = any(not Path(t).is_file() for t in tasks)
    try:
        manager = TaskManager(include_path=include_path, include_defaults=builtin)
    except Exception as err:  # the harness raises many types for a bad include folder
        raise UserError(f"lm-eval could not index tasks: {str(err).splitlines()[0]}") from err
    results = {}
    for name, model in models.items():
        wrapper = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            out = lm_eval.simple_evaluate(model=wrapper, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False)
        except Exception as err:  # a missing task or an unreachable dataset: say which, in one line
            raise UserError(f"lm-eval failed on {', '.join(tasks)}: {str(err).splitlines()[0]}") from err
        results[name] = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "sample_len"}
                         for task, metrics in out["results"].items()}
    return results


def lm_eval_table(results: dict) -> str:
    student, teacher = results["student"], results.get("teacher")
    rows = []
    for task, metrics in student.items():
        for metric, value in metrics.items():
            if "_stderr" in metric:
                continue
            other = teacher[task].get(metric) if teacher else None
            ratio = value / other if other else None
            rows.append([task, metric, value, other, ratio])
    return format_table(["task", "metric", "hybrid", "teacher", "hybrid / teacher"], rows)
