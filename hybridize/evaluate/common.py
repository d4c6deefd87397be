"""What eval, bench and push share: loading a hybrid folder and its teacher, device and dtype choice, atomic writes."""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..atomic import check_output_folder
from ..dtypes import DTYPES, parse_dtype
from ..errors import UserError
from ..teacher import DEFAULT_TEACHER, _fill_special_tokens, load_teacher, recorded_teacher_path

NO_TEACHER = "none"
# --small with the 135M embedded teacher and its hybrid, measured on 2 CPU cores that other jobs kept busy (load
# average 4-5); on idle cores the same work runs many times faster (README, "Times on a CPU").
SMALL_TIMES = {"eval": "9 minutes for a 135M model on 2 busy CPU cores",
               "bench": "5 minutes for a 135M model on 2 busy CPU cores"}


def pick_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The dtype given (a torch dtype or its name), else bf16 on a GPU (what the models are served in) and fp32 on
    the CPU (where bf16 matmuls are slow and inexact)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype)


def load_hybrid(
    path: str | Path, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(HybridForCausalLM in eval mode, tokenizer) from a folder written by convert or distill.

    dtype="auto" keeps the dtype the weights were saved in.
    """
    from ..model import HybridForCausalLM  # registers the hybrid with the Auto classes

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not a model folder (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UserError(f"{folder} could not be loaded: {str(err).splitlines()[0]}") from err
    if not isinstance(model, HybridForCausalLM):
        raise UserError(f"{folder} holds a {type(model).__name__}, not a hybridize model")
    model.to(device).eval()
    _fill_special_tokens(model, tokenizer)
    return model, tokenizer


def recorded_teacher(path: str | Path) -> tuple[str, str] | None:
    """(teacher, record file name) from the hybrid's distill.json or conversion.json, when the folder has one."""
    for name in ("distill.json", "conversion.json"):
        record = Path(path) / name
        if record.is_file():
            teacher = json.loads(record.read_text()).get("teacher")
            teacher = teacher.get("name") if isinstance(teacher, dict) else teacher
            return (recorded_teacher_path(teacher, Path(path)), name) if teacher else None
    return None


def load_pair(
    hybrid_path: str | Path, teacher_arg: str | None, *, dtype: torch.dtype, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedModel | None, PreTrainedTokenizerBase, str | None]:
    """(student, teacher or None, tokenizer, teacher name): both models on one device in one dtype.

    The teacher is --teacher as given; else the one the hybrid's record names; else the embedded default.
    "none": no teacher.
    """
    student, tokenizer = load_hybrid(hybrid_path, dtype=dtype, device=device)
    if teacher_arg == NO_TEACHER:
        return student, None, tokenizer, None
    recorded = None if teacher_arg else recorded_teacher(hybrid_path)
    name = teacher_arg or (recorded[0] if recorded else DEFAULT_TEACHER)
    try:
        teacher, teacher_tokenizer = load_teacher(name, dtype=dtype, device=device)
    except UserError as err:
        if recorded is None:
            raise
        # A record made elsewhere (another machine, or a relative path from another directory) names a teacher
        # that is not here: say which flag picks one.
        raise UserError(f"the teacher recorded in {Path(hybrid_path) / recorded[1]} cannot be loaded ({err}); "
                        f"pass --teacher MODEL, or --teacher {NO_TEACHER} for the hybrid alone") from err
    if teacher.config.vocab_size != student.config.vocab_size or len(teacher_tokenizer) != len(tokenizer):
        raise UserError(f"teacher {name!r} has a different vocabulary from the hybrid; pass the teacher it came from")
    return student, teacher, tokenizer, name


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain fixed-width text table; floats get 4 significant digits, None prints as '-'."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [[cell(v) for v in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: "1024,2048" -> (1024, 2048)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def comma_joined(values) -> str:
    """(1024, 2048) -> "1024,2048": how int_list and float_list values are written on the command line."""
    return ",".join(map(str, values))


def float_list(text: str) -> tuple[float, ...]:
    """argparse type: "0,0.5,1" -> (0.0, 0.5, 1.0)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def output_folder(
    hybrid: str | Path, out_dir: str | Path | None, command: str, overwrite: bool
) -> tuple[Path, bool]:
    """(OUT, may replace what an earlier run wrote there): the default HYBRID/eval or HYBRID/bench (out_dir None)
    is ours to refresh; a folder the user names must be empty unless `overwrite`. Checked before the long work."""
    replace = overwrite or out_dir is None
    out_dir = Path(hybrid) / command if out_dir is None else Path(out_dir)
    check_output_folder(out_dir, overwrite=replace)
    return out_dir, replace


def add_common_arguments(parser, what: str) -> None:
    """HYBRID, --teacher, --out, --small, --device, --dtype: what eval and bench both take."""
    parser.add_argument("hybrid", help="a hybrid model folder (from hybridize convert or distill)")
    parser.add_argument("--teacher", default=None,
                        help="the teacher to compare with: HF id, folder or alias; default: the one the hybrid was "
                             f"converted from; '{NO_TEACHER}' for the hybrid alone")
    parser.add_argument("--out", default=None,
                        help=f"output folder (default: HYBRID/{what}, where an earlier run's files are replaced); "
                             "a given folder that is not empty is refused unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"write into a non-empty --out, replacing the files {what} writes (other files are kept)")
    parser.add_argument("--small", action="store_true", help=f"CPU-sized settings ({SMALL_TIMES[what]})")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
