"""The remote code every saved hybrid folder carries, so it loads with only torch and transformers.

hybridize/model/*.py are copied as they are (the package is flat and imports relatively), plus an ops.py written
here: it takes the kernels from `hybridize.kernels` only when the installed `hybridize` is this toolkit at the
version that wrote the folder (Triton on GPU), and otherwise the plain-PyTorch references, copied beside it as
ref_<op>.py. config.json gets an auto_map, so `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` works where hybridize is not installed; where it is imported, its registered classes win.
"""

import ast
import json
import re
from pathlib import Path

from .. import __hybridize_toolkit__, __version__
from .. import model as model_package

AUTO_MAP = {
    "AutoConfig": "configuration_hybrid.HybridConfig",
    "AutoModel": "modeling_hybrid.HybridModel",
    "AutoModelForCausalLM": "modeling_hybrid.HybridForCausalLM",
}
KERNEL_PACKAGE = "hybridize.kernels."
_BARE_RELATIVE = re.compile(r"^from \. import (\w+)$", re.MULTILINE)
# A reference that builds on another op's reference imports it absolutely; the exported copy imports its ref_ file.
_OTHER_REFERENCE = re.compile(r"^from hybridize\.kernels\.(\w+)\.reference import", re.MULTILINE)

# The exported ops.py. The installed `hybridize` is identified by reading its __init__.py, never by importing it:
# a different package that took the name on an index must not run in the process of someone loading the model.
# transformers skips imports inside `try` when it lists the packages remote code needs, so hybridize stays optional.
_OPS_TEMPLATE = '''"""The model's sequence-mixing kernels: the Triton kernels of the hybridize toolkit when the version
that wrote this folder is installed, else the plain-PyTorch references in the ref_*.py files beside this one."""

import ast
import importlib.util

TOOLKIT_MARK = {mark!r}
TOOLKIT_VERSION = {version!r}


def _toolkit_installed() -> bool:
    """Whether `hybridize` is the toolkit at TOOLKIT_VERSION, read from its __init__.py without running it."""
    spec = importlib.util.find_spec("hybridize")
    if spec is None or not spec.origin or not spec.origin.endswith("__init__.py"):
        return False
    try:
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return False
    constants = {{target.id: node.value.value for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                 for target in node.targets if isinstance(target, ast.Name)}}
    return (constants.get("__hybridize_toolkit__") == TOOLKIT_MARK
            and constants.get("__version__") == TOOLKIT_VERSION)


try:
    if not _toolkit_installed():
        raise ImportError("hybridize {version} is not installed")
{fast}
except ImportError:
{fallback}

__all__ = [{exported}]
'''


def model_sources() -> list[Path]:
    """hybridize/model/*.py that are exported as they are (not __init__, which registers Auto classes, nor ops)."""
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


def _reference_source(op: str, names: list[str], exported_ops: set[str]) -> str:
    """The op's reference.py, checked to import nothing but the other exported references and to define every name
    the model imports; its imports of those references become imports of their ref_ files."""
    path = Path(model_package.__file__).parent.parent / "kernels" / op / "reference.py"
    source = path.read_text()
    tree = ast.parse(source)
    relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    if relative:
        raise RuntimeError(f"{path} imports relatively (line {relative[0].lineno}); the exported copy would break")
    unexported = sorted(set(_OTHER_REFERENCE.findall(source)) - exported_ops)
    if unexported:
        raise RuntimeError(f"{path} builds on the reference of {', '.join(unexported)}, which the model does not "
                           "import from hybridize/model/ops.py, so the export would not carry it")
    source = _OTHER_REFERENCE.sub(lambda m: f"from .ref_{m.group(1)} import", source)
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
    return _OPS_TEMPLATE.format(mark=__hybridize_toolkit__, version=__version__, fast=fast, fallback=fallback,
                                exported=exported)


def write_code(folder: Path) -> list[str]:
    """Write the remote code into `folder`; return the file names."""
    written = []
    for path in model_sources():
        (folder / path.name).write_text(_visible_to_transformers(path.read_text()))
        written.append(path.name)
    imports = kernel_imports()
    for op, names in imports:
        (folder / f"ref_{op}.py").write_text(_reference_source(op, names, {op for op, _ in imports}))
        written.append(f"ref_{op}.py")
    (folder / "ops.py").write_text(ops_source(imports))
    return [*written, "ops.py"]


def add_remote_code(folder: Path) -> list[str]:
    """Make a saved hybrid `folder` loadable without hybridize: the code files, and auto_map in its config.json."""
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = dict(AUTO_MAP)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return write_code(Path(folder))
