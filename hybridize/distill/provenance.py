"""Run records that can be published: local paths become paths inside the run folder, or just names.

distill.json travels with the model (`hybridize push` uploads it); an absolute path there would publish the
trainer's home directory and mean nothing on another machine.
"""

from pathlib import Path

from .recipe import Recipe, recipe_to_dict


def portable_path(path, run_folder: Path) -> str:
    """Relative to `run_folder` when inside it, else only the last part of the path."""
    path, run_folder = Path(path).absolute(), Path(run_folder).absolute()
    return str(path.relative_to(run_folder)) if path.is_relative_to(run_folder) else path.name


def _portable_if_local(value, run_folder: Path):
    """A value that names an existing file or folder, made portable; aliases, Hub ids and specs unchanged."""
    return portable_path(value, run_folder) if isinstance(value, str) and Path(value).exists() else value


def portable_recipe(recipe: Recipe, run_folder: Path) -> dict:
    record = recipe_to_dict(recipe)
    record["output_dir"] = Path(recipe.output_dir).name
    if recipe.init is not None:
        record["init"] = portable_path(recipe.init, run_folder)
    for key in ("plan", "teacher"):
        record[key] = _portable_if_local(record[key], run_folder)
    record["data"]["source"] = _portable_if_local(record["data"]["source"], run_folder)
    return record


def portable_data_record(record: dict, run_folder: Path) -> dict:
    portable = {**record, "source": _portable_if_local(record.get("source"), run_folder)}
    if "files" in record:
        portable["files"] = {_portable_if_local(name, run_folder): size for name, size in record["files"].items()}
    return portable
