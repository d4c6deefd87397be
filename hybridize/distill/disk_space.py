"""Full disks: a stage's writes checked against the free space before it trains, and a full disk recognized
behind the errors that the writers raise for it.

A full disk does not always arrive as OSError(ENOSPC): torch.save's zip writer turns it into a RuntimeError
("PytorchStreamWriter failed writing file ..." or "unexpected pos N vs M"), and safetensors into a
SafetensorError naming StorageFull. Each is read here, through the chain of causes.
"""

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

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
    """Free space on the file system that holds `folder` (or its nearest existing parent), e.g. '12.0 MB free'."""
    return f"{size_text(free_bytes(folder))} free"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).is_dir() else 0


def free_bytes(folder: Path) -> int:
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


# Beside the weights, a checkpoint holds RNG states and progress, a model folder its code, JSON records and loss
# curve: tens to hundreds of KB, allowed for in full per folder.
SMALL_FILES = 256 * 1024


def size_text(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


@dataclass(frozen=True)
class StageWrites:
    """What a stage writes to disk that it did not find there: checkpoints, then its model folder."""

    checkpoint: int  # bytes of one checkpoint
    saves: int  # checkpoints still to write
    held: int  # checkpoints kept on disk at once
    model: int  # bytes of the model folder written at the end
    existing: int  # bytes of this stage's checkpoints already on disk (a resumed run)

    def peak(self) -> int:
        """Extra bytes at the fullest moment: the checkpoints held, plus the next one written before the oldest is
        removed, or the model folder, written before the checkpoints are removed."""
        held = min(self.held, self.saves)
        rotating = self.checkpoint if self.saves > held else 0
        return max(0, held * self.checkpoint + max(rotating, self.model) - self.existing)


def check_disk_room(folder: Path, stage_name: str, writes: StageWrites) -> None:
    """A UserError before training when the stage's writes cannot fit: hours of training would end on a full disk."""
    needed, free = writes.peak(), free_bytes(folder)
    if needed > free:
        held = min(writes.held, writes.saves)
        raise UserError(f"stage {stage_name!r} needs about {size_text(needed)} of disk under {folder} ({held} "
                        f"checkpoint(s) of {size_text(writes.checkpoint)} while it trains, then its "
                        f"{size_text(writes.model)} model) and {size_text(free)} are free; "
                        "free some space or choose another --out")
