"""The folder `hybridize push` uploads: weights, tokenizer, records, eval/bench results, and the remote code
(hybridize.publish.remote_code), so the model loads with only torch and transformers."""

import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..evaluate.common import load_hybrid
from .remote_code import add_remote_code

# Records written by convert (conversion.json) and distill (distill.json, stage.json, loss_curve.png).
RECORD_FILES = ("conversion.json", "distill.json", "stage.json", "loss_curve.png")
RESULT_FILES = {"eval": ("eval.json", "eval.png", "passkey.png"), "bench": ("bench.json", "bench.png")}


def export_folder(hybrid: Path, folder: Path) -> dict:
    """Fill the empty `folder` with everything but the model card; return what the card needs to know."""
    model, tokenizer = load_hybrid(hybrid, dtype="auto")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    code = add_remote_code(folder)
    records = [name for name in RECORD_FILES if (hybrid / name).is_file()]
    for name in records:
        shutil.copy2(hybrid / name, folder / name)
    results = {}
    for sub, names in RESULT_FILES.items():
        present = [n for n in names if (hybrid / sub / n).is_file()]
        if present:
            (folder / sub).mkdir()
            for name in present:
                shutil.copy2(hybrid / sub / name, folder / sub / name)
            results[sub] = present
    return {"model": model, "code": code, "records": records, "results": results}


def check_loadable(hybrid_path: Path) -> None:
    """A clear error before any work when HYBRID is not a hybrid folder."""
    if not (hybrid_path / "config.json").is_file():
        raise UserError(f"{hybrid_path}: not a model folder (no config.json)")


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
