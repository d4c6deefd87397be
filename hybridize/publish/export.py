"""The folder `hybridize push` uploads: weights, tokenizer, records, eval/bench results, and remote code.

The remote code is hybridize/model/*.py copied as they are (the package is flat and imports relatively),
plus an ops.py written here: it imports the kernels from `hybridize.kernels` when hybridize is installed
(Triton on GPU), and otherwise the plain-PyTorch references, copied beside it as ref_<op>.py. config.json
gets an auto_map, so `AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)` needs only
torch and transformers.
"""

import ast
import re
import shutil
from pathlib import Path

import torch

from .. import model as model_package
from ..errors import UserError
from ..evaluate.common import load_hybrid

AUTO_MAP = {
    "AutoConfig": "configuration_hybrid.HybridConfig",
    "AutoModel": "modeling_hybrid.HybridModel",
    "AutoModelForCausalLM": "modeling_hybrid.HybridForCausalLM",
}
# Records written by convert (conversion.json) and distill (distill.json, stage.json, loss_curve.png).
RECORD_FILES = ("conversion.json", "distill.json", "stage.json", "loss_curve.png")
RESULT_FILES = {"eval": ("eval.json", "eval.png", "passkey.png"), "bench": ("bench.json", "bench.png")}
KERNEL_PACKAGE = "hybridize.kernels."
EXPORT_MARKER = "ops.py"  # only an export folder has one at its top level
_BARE_RELATIVE = re.compile(r"^from \. import (\w+)$", re.MULTILINE)


def model_sources() -> list[Path]:
    """hybridize/model/*.py that go to the Hub as they are (not __init__, which registers Auto classes, nor ops)."""
    folder = Path(model_package.__file__).parent
    return sorted(p for p in folder.glob("*.py") if p.name not in ("__init__.py", "ops.py"))


def _visible_to_transformers(source: str) -> str:
    """transformers copies remote-code files it finds in `from .name import ...` lines only, not `from . import name`:
    add, under each such line, one it can see (it imports the same module, so behaviour is unchanged)."""
    return _BARE_RELATIVE.sub(lambda m: f"{m.group(0)}\nfrom .{m.group(1)} import __name__ as _{m.group(1)}_module",
                              source)


def kernel_imports() -> list[tuple[str, list[str]]]:
    """[(op, [names])] from hybridize/model/ops.py's `from hybridize.kernels.<op> import ...` lines."""
    tree = ast.parse((Path(model_package.__file__).parent / "ops.py").read_text())
    found = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(KERNEL_PACKAGE):
            found.append((node.module[len(KERNEL_PACKAGE):], [a.name for a in node.names]))
    if not found:
        raise RuntimeError("hybridize/model/ops.py imports no kernels from hybridize.kernels; export needs updating")
    return found


def _reference_source(op: str, names: list[str]) -> str:
    """The op's reference.py, checked to be self-contained and to define every name the model imports."""
    path = Path(model_package.__file__).parent.parent / "kernels" / op / "reference.py"
    source = path.read_text()
    tree = ast.parse(source)
    relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    if relative:
        raise RuntimeError(f"{path} imports relatively (line {relative[0].lineno}); the exported copy would break")
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    missing = sorted(set(names) - defined)
    if missing:
        raise RuntimeError(f"{path} does not define {', '.join(missing)}, which the model calls")
    return source


def ops_source(imports: list[tuple[str, list[str]]]) -> str:
    fast = "\n".join(f"    from hybridize.kernels.{op} import {', '.join(names)}" for op, names in imports)
    fallback = "\n".join(f"    from .ref_{op} import {', '.join(names)}" for op, names in imports)
    exported = ", ".join(f'"{n}"' for _, names in imports for n in names)
    return (
        '"""The model\'s sequence-mixing kernels: hybridize\'s Triton kernels when hybridize is installed,\n'
        'else the plain-PyTorch references in the ref_*.py files beside this one (written by hybridize push)."""\n\n'
        f"try:\n{fast}\nexcept ImportError:\n{fallback}\n\n__all__ = [{exported}]\n"
    )


def write_code(folder: Path) -> list[str]:
    """Write the remote code into `folder`; return the file names."""
    written = []
    for path in model_sources():
        (folder / path.name).write_text(_visible_to_transformers(path.read_text()))
        written.append(path.name)
    imports = kernel_imports()
    for op, names in imports:
        (folder / f"ref_{op}.py").write_text(_reference_source(op, names))
        written.append(f"ref_{op}.py")
    (folder / "ops.py").write_text(ops_source(imports))
    return [*written, "ops.py"]


def export_folder(hybrid: Path, folder: Path) -> dict:
    """Fill the empty `folder` with everything but the model card; return what the card needs to know."""
    model, tokenizer = load_hybrid(hybrid, dtype="auto")
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    code = write_code(folder)
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
