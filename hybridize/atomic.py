"""Safe output: a reader (or a crash) never sees half a file or half a folder, and no file of the user's is deleted.

Every command that writes output (convert, analyze, distill's export, eval, bench, push --dry-run) goes through
these helpers, so the rules hold in one place:
- a new output folder is built in a hidden sibling, `.NAME.partial-HOST-PID-RANDOM`, and renamed into place whole;
- an existing folder that is not empty is written into only when replacing is allowed (`--overwrite`): the new
  files are staged inside it, then moved over the same names; what an earlier hybridize command wrote there (listed
  in its OUTPUT_RECORD) and this run did not write again is removed; every other file and folder is kept. A folder
  hybridize did not create is never deleted, and neither is the working directory or one of its parents;
- staging folders left by a process that died (kill -9) are removed the next time a command writes that folder:
  their name carries the host and process id that made them;
- files and folders get the permissions the user's umask gives, like any other program's output.
"""

import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .errors import UserError

OUTPUT_RECORD = ".hybridize-output.json"  # which entries of the folder a hybridize command wrote
_INSIDE_PREFIX = ".hybridize"  # a staging folder inside an existing output folder: .hybridize.partial-...
_PARTIAL = re.compile(r"\.partial-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def check_output_folder(target: str | Path, *, overwrite: bool) -> Path:
    """The absolute output folder, after refusing what must not be written: a file, or (without `overwrite`) a
    folder that is not empty. Commands call this before their long work, and staged_folder again at the end."""
    absolute = Path(os.path.abspath(target))
    if absolute.exists() and not absolute.is_dir():
        raise UserError(f"output {target} exists and is not a folder")
    if not overwrite and absolute.is_dir() and any(absolute.iterdir()):
        raise UserError(f"output directory {target} exists and is not empty; pass --overwrite to replace the "
                        "files hybridize writes there (other files are kept)")
    return absolute


@contextmanager
def staged_folder(target: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder; on success its files become `target`'s, on error it is removed and `target`
    is as it was. `replace`: an existing non-empty `target` may be written into (see the module docstring)."""
    absolute = check_output_folder(target, overwrite=replace)
    absolute.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_partials(absolute)
    existing = absolute.is_dir()
    staging = _new_partial(absolute / _INSIDE_PREFIX if existing else absolute.parent / f".{absolute.name}")
    try:
        yield staging
        _follow_umask(staging)
        if existing:
            _move_into(staging, absolute)
        else:
            _write_record(staging, sorted(p.name for p in staging.iterdir()))
            staging.rename(absolute)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _new_partial(stem: Path) -> Path:
    path = stem.with_name(f"{stem.name}.partial-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
    path.mkdir()  # mode 0o777 less the umask, as for any folder the user makes
    return path


def _follow_umask(folder: Path) -> None:
    """Give what was written the umask's permissions: safetensors (and mkstemp) make files private (0o600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    for root, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


def remove_dead_partials(target: Path) -> list[Path]:
    """Remove staging folders of `target` whose process, on this host, no longer runs; return them."""
    places = ((target.parent, f".{target.name}.partial-"), (target, f"{_INSIDE_PREFIX}.partial-"))
    removed = []
    for folder, prefix in places:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = _PARTIAL.search(path.name) if path.name.startswith(prefix) else None
            if (match and match["host"] == socket.gethostname() and path.is_dir() and not path.is_symlink()
                    and not _alive(int(match["pid"]))):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _recorded_entries(folder: Path) -> set[str]:
    try:
        return set(json.loads((folder / OUTPUT_RECORD).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _write_record(folder: Path, names: list[str]) -> None:
    write_json_atomic(folder / OUTPUT_RECORD, {"written_by": f"hybridize {__version__}", "files": names})


def _refuse_to_delete(path: Path) -> None:
    """Deleting a folder that holds the working directory would pull the ground from under the user's shell."""
    here = Path.cwd().resolve()
    if path.resolve() == here or path.resolve() in here.parents:
        raise UserError(f"{path} would have to be deleted, but it holds the working directory; pick another --out")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        _refuse_to_delete(path)
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _move_into(staging: Path, target: Path) -> None:
    """Move the staged entries over `target`'s; drop our earlier entries this run did not write again."""
    ours = _recorded_entries(target)
    names = sorted(p.name for p in staging.iterdir())
    for name in names:  # every check before the first move, so a refusal changes nothing
        dest = target / name
        if (dest.is_dir() or (staging / name).is_dir()) and (dest.exists() or dest.is_symlink()):
            if name not in ours:
                raise UserError(f"{dest} is in the way and was not written by hybridize; move it or pick another --out")
            if dest.is_dir() and not dest.is_symlink():
                _refuse_to_delete(dest)
    for name in names:
        dest = target / name
        if name in ours and (dest.is_dir() or (staging / name).is_dir()):
            _remove(dest)
        os.replace(staging / name, dest)
    for name in sorted(ours - set(names) - {OUTPUT_RECORD}):
        _remove(target / name)
    staging.rmdir()
    _write_record(target, names)


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        # 0o666 less the umask, as open() gives; mkstemp's private 0o600 would hide results from the user's group.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_cache_folder(target: Path, marker: str, write: Callable[[Path], None]) -> Path:
    """`target` made once: `write` fills a hidden temporary sibling, which is renamed into place whole. Processes
    that race each write their own copy; the first rename wins, and the others' copies are removed. `marker`: a
    file every finished folder holds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        write(staging)
        staging.rename(target)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) and (target / marker).exists():  # another process renamed its copy first
            return target
        raise
    return target
