"""One run per output folder: an exclusive lock held for the run's lifetime, and the cleanup it makes safe.

The lock is `fcntl.flock` on OUTPUT_DIR/.lock, which holds the holder's PID. The kernel drops it when the
holder exits, however it exits (kill -9 included), so a lock never outlives its run.
"""

import fcntl
import os
import shutil
from pathlib import Path

from ..atomic import remove_dead_partials
from ..errors import UserError
from .checkpoints import PARTIAL_PREFIX

LOCK_FILE = ".lock"


class RunLock:
    """Exclusive use of `folder` (created if missing) until `release` or the process ends."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (a no-op when this object holds it already), or refuse with one line naming the holder."""
        if self._fd is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"output directory {self.folder} is in use by another run (PID {holder}); "
                            "wait for it to end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def holds_run_files(folder: Path) -> bool:
    """Whether `folder` holds anything besides the lock file (a run's output, or something else)."""
    return folder.is_dir() and any(path.name != LOCK_FILE for path in folder.iterdir())


def remove_stale_partials(folder: Path, staged_outputs: list[Path]) -> None:
    """Remove what killed writers left half-written in the run folder; call only while holding its lock.

    Staged outputs (init/, stages/*, final/) are built by hybridize.atomic, whose staging names carry the
    writer's host and PID: those of dead writers go. Checkpoint partials (checkpoints/*/.partial-step-N) are
    written only by the run that holds the lock, so while this process holds it they are all stale.
    """
    for target in staged_outputs:
        remove_dead_partials(target)
    for path in Path(folder).glob(f"checkpoints/*/{PARTIAL_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
