"""The dtype policy in one place: the names users type, and the dtype a checkpoint folder is stored in.

Policy (docs/conversion.md, "Dtypes"): a teacher is read in the dtype its weights are stored in, and conversion
writes the hybrid in that dtype unless `--dtype` says otherwise. The mixers' decay and skip parameters (A_log,
dt_bias, D) stay fp32 in every saved hybrid (`HybridPreTrainedModel._keep_in_fp32_modules_strict`). Training
loads the student in fp32 (master weights) and runs bf16 autocast; the teacher runs in the autocast dtype. A kd stage
holds its frozen linear weights in bf16 where that is exact (distill/frozen_weights.py).
"""

import json
import math
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16' -> torch.bfloat16; anything outside DTYPES is one line."""
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def stored_dtype(folder: str | Path) -> torch.dtype:
    """The floating dtype that most of a folder's safetensors weights are stored in (read from the file headers).

    The headers are the truth: config.json's `dtype` is optional and, for a model saved after `.to()`, can disagree.
    """
    counts: Counter = Counter()
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(tensor.get_dtype())
                    if dtype is not None:
                        counts[dtype] += math.prod(tensor.get_shape())
        except (SafetensorError, OSError) as err:
            raise UserError(f"weight file {path} is unreadable or corrupt: {err}") from err
    if not counts:
        return _configured_dtype(folder)
    return counts.most_common(1)[0][0]


def _configured_dtype(folder: str | Path) -> torch.dtype:
    config = Path(folder) / "config.json"
    name = json.loads(config.read_text()).get("dtype") if config.is_file() else None
    return DTYPES.get(name, torch.float32)
