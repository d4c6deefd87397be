"""Recognizing a full disk behind the errors that the writers raise for it.

A full disk does not always arrive as OSError(ENOSPC): torch.save's zip writer turns it into a RuntimeError
("PytorchStreamWriter failed writing file ..." or "unexpected pos N vs M"), and safetensors into a
SafetensorError naming StorageFull. Each is read here, through the chain of causes.
"""

import errno
import shutil
from pathlib import Path

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# Messages of writers that lose the errno: torch's zip writer, and safetensors' Rust I/O error.
_WRITER_MESSAGES = ("No space left on device", "StorageFull", "PytorchStreamWriter failed", "unexpected pos ")


def is_disk_full(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return True
        if any(text in str(err) for text in _WRITER_MESSAGES):
            return True
        err = err.__cause__ or err.__context__
    return False


def free_space(folder: Path) -> str:
    """Free space on the file system that holds `folder` (or its nearest existing parent), e.g. '12 MB free'."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return f"{shutil.disk_usage(folder).free / 1e6:,.0f} MB free"
